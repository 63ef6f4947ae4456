//! Work spread over the cores on scoped threads.

/// `f` over `items` on every core, results in order.
pub(super) fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = parallel_threads();
    if threads < 2 || items.len() < 2 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(|| part.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// `f` on each of `items` on every core, each thread taking a run of them.
pub(super) fn parallel_for_each<T: Send>(items: &mut [T], f: impl Fn(&mut T) + Sync) {
    let threads = parallel_threads();
    if threads < 2 || items.len() < 2 {
        items.iter_mut().for_each(f);
        return;
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        for part in items.chunks_mut(chunk) {
            scope.spawn(move || part.iter_mut().for_each(f));
        }
    });
}

/// Threads for [`parallel_map`] and [`parallel_for_each`]: one per core.
pub(super) fn parallel_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
