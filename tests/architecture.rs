//! The engine's layering, checked from the source: every import between the
//! crate's top-level modules points down, connectors depend on the contract
//! alone, and no source file grows past the size where it holds more than one
//! concern. DESIGN.md draws the same layers; this test is where they are
//! written once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// The crate's top-level modules by layer, top first. A module may import
/// from any layer below its own, never from its own layer's other modules
/// or from above (the exceptions are in [`SIDEWAYS`]).
const LAYERS: &[&[&str]] = &[
    &["commands", "demo"],
    &["runtime"],
    &["transport", "ops"],
    &["publish"],
    &["classify"],
    &["config"],
    &["store", "failpoint"],
];

/// Imports allowed within one layer: the demo runs pipelines through the
/// commands' loading and signal handling.
const SIDEWAYS: &[(&str, &str)] = &[("demo", "commands")];

/// Lines a source file may have, its unit tests included (a module of unit
/// tests alone, `tests.rs`, is exempt).
const MAX_LINES: usize = 1_000;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A path as the repository names it.
fn relative(file: &Path) -> String {
    file.strip_prefix(root())
        .unwrap_or(file)
        .display()
        .to_string()
}

/// The source folders of the connector crates.
fn connector_sources() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("connectors"))
        .expect("connectors/")
        .map(|entry| entry.expect("an entry").path().join("src"))
        .filter(|src| src.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The module path of a file under `src/` (`src/publish/plan.rs` →
/// `["publish", "plan"]`; `mod.rs` and `lib.rs` name their folder).
fn module_of(file: &Path) -> Vec<String> {
    let relative = file
        .strip_prefix(root().join("src"))
        .expect("a file under src/");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// Collects the crate-level module every path in a file reaches
/// (`crate::x::...`, `super::...` resolved against the file's module).
struct Reach<'a> {
    module: &'a [String],
    /// Modules nested inside the file (`mod tests { .. }`), so `super` in
    /// them resolves one level lower.
    nested: Vec<String>,
    found: BTreeSet<String>,
}

impl Reach<'_> {
    fn note(&mut self, segments: &[String]) {
        let Some(first) = segments.first() else {
            return;
        };
        let mut here: Vec<String> = self.module.to_vec();
        here.extend(self.nested.iter().cloned());
        let target = match first.as_str() {
            "crate" => segments.get(1).cloned(),
            "super" => {
                let ups = segments.iter().take_while(|s| *s == "super").count();
                let base = here.len().saturating_sub(ups);
                here.truncate(base);
                here.first().cloned().or_else(|| segments.get(ups).cloned())
            }
            _ => None,
        };
        if let Some(target) = target {
            self.found.insert(target);
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.note(prefix);
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.note(prefix);
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.note(prefix),
            syn::UseTree::Group(g) => {
                for tree in &g.items {
                    self.use_tree(prefix, tree);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Reach<'_> {
    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.note(&segments);
        syn::visit::visit_path(self, path);
    }

    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        self.nested.push(item.ident.to_string());
        syn::visit::visit_item_mod(self, item);
        self.nested.pop();
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        // Paths inside macro calls (`tracing::info!(..)`, `matches!(..)`) are
        // tokens to syn; read the ones that name the crate.
        let mut tokens = Vec::new();
        flatten(mac.tokens.clone(), &mut tokens);
        for (i, token) in tokens.iter().enumerate() {
            if (token == "crate" || token == "super") && tokens.get(i + 1).is_some_and(|t| t == ":")
            {
                let mut segments = vec![token.clone()];
                let mut j = i + 1;
                while tokens.get(j).is_some_and(|t| t == ":")
                    && tokens.get(j + 1).is_some_and(|t| t == ":")
                    && let Some(next) = tokens.get(j + 2)
                {
                    segments.push(next.clone());
                    j += 3;
                }
                self.note(&segments);
            }
        }
        syn::visit::visit_macro(self, mac);
    }
}

/// The tokens of a stream, groups opened, as text.
fn flatten(stream: proc_macro2::TokenStream, out: &mut Vec<String>) {
    for token in stream {
        match token {
            proc_macro2::TokenTree::Group(g) => flatten(g.stream(), out),
            other => out.push(other.to_string()),
        }
    }
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// Every crate-level module each file of `src/` imports from, by the file's
/// own top-level module.
fn imports() -> BTreeMap<PathBuf, (String, BTreeSet<String>)> {
    let mut out = BTreeMap::new();
    for file in rust_files(&root().join("src")) {
        let module = module_of(&file);
        let Some(top) = module.first().cloned() else {
            continue; // lib.rs and main.rs: the crate's root sees everything
        };
        let text = std::fs::read_to_string(&file).expect("a readable source file");
        let syntax = syn::parse_file(&text)
            .unwrap_or_else(|e| panic!("{}: does not parse: {e}", file.display()));
        let mut reach = Reach {
            module: &module,
            nested: Vec::new(),
            found: BTreeSet::new(),
        };
        reach.visit_file(&syntax);
        reach.found.remove(&top);
        out.insert(file, (top, reach.found));
    }
    out
}

#[test]
fn every_module_is_in_a_layer() {
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).expect("src/lib.rs");
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert!(declared.len() >= 8, "modules of lib.rs: {declared:?}");
    for module in declared {
        assert!(
            layer_of(module).is_some(),
            "module `{module}` is in no layer; add it to LAYERS in tests/architecture.rs and to DESIGN.md"
        );
    }
}

#[test]
fn imports_point_down_the_layers() {
    let mut wrong = Vec::new();
    for (file, (from, targets)) in imports() {
        let Some(from_layer) = layer_of(&from) else {
            continue; // reported by every_module_is_in_a_layer
        };
        for to in targets {
            let Some(to_layer) = layer_of(&to) else {
                continue; // an item of the crate's root, not a module
            };
            let down = to_layer > from_layer;
            if !down && !SIDEWAYS.contains(&(from.as_str(), to.as_str())) {
                wrong.push(format!(
                    "{}: `{from}` imports `{to}`, which is not below it",
                    relative(&file)
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering (DESIGN.md, \"Layers\"):\n{}",
        wrong.join("\n")
    );
}

/// The checker sees the forms imports take: grouped, nested, `super`, in a
/// macro, in a nested test module.
#[test]
fn the_checker_sees_every_form_of_import() {
    let text = r#"
        use crate::{store::Store, runtime::{self, RunError}};
        use super::super::ops::serve;
        fn f() { crate::transport::encode(); tracing::info!(x = ?crate::demo::run()); }
        mod tests { use super::super::super::commands::load; }
    "#;
    let module = vec!["publish".to_string(), "plan".to_string()];
    let mut reach = Reach {
        module: &module,
        nested: Vec::new(),
        found: BTreeSet::new(),
    };
    reach.visit_file(&syn::parse_file(text).expect("parses"));
    let found: Vec<&str> = reach.found.iter().map(String::as_str).collect();
    // `super::super` from publish::plan is the crate root: `ops` is reached.
    assert_eq!(
        found,
        ["commands", "demo", "ops", "runtime", "store", "transport"]
    );
}

/// A connector depends on the contract (`connectors/api`) and on no other
/// part of oppen.
#[test]
fn connectors_depend_on_the_contract_alone() {
    let mut wrong = Vec::new();
    for src in connector_sources() {
        let manifest = src.with_file_name("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).expect("a connector's Cargo.toml");
        let mut section = String::new();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                section = line.to_string();
                continue;
            }
            if section == "[dependencies]"
                && (line.starts_with("oppen") && !line.starts_with("oppen-connector-api"))
            {
                wrong.push(format!("{}: {line}", relative(&manifest)));
            }
        }
        // No file of a connector reaches for the engine either.
        for file in rust_files(&src) {
            let text = std::fs::read_to_string(&file).expect("a readable source file");
            if text.contains("oppen::") {
                wrong.push(format!("{}: names the engine (`oppen::`)", relative(&file)));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn no_source_file_holds_too_much() {
    let mut files = rust_files(&root().join("src"));
    for src in connector_sources() {
        files.extend(rust_files(&src));
    }
    let mut large = Vec::new();
    for file in files {
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("a readable source file");
        let lines = text.lines().count();
        if lines > MAX_LINES {
            large.push(format!("{}: {lines} lines", relative(&file)));
        }
    }
    assert!(
        large.is_empty(),
        "files over {MAX_LINES} lines; split them by concern:\n{}",
        large.join("\n")
    );
}
