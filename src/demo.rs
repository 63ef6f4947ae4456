pub async fn run(_d: &std::path::Path, _o: bool, _p: f64, _n: Option<usize>) -> Result<std::process::ExitCode, crate::commands::CommandError> { Ok(std::process::ExitCode::SUCCESS) }
