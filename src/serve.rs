//! `serve` and `check`: load the config, start the pools, admin and listeners; validate.

use std::path::Path;
use std::process::ExitCode;

pub fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let cfg = match crate::config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Some(dns) = &cfg.dns {
        if let Err(e) = crate::config::regions::load(&dns.regions) {
            eprintln!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    }
    println!("{}: ok (pop {})", path.display(), cfg.pop.name);
    Ok(ExitCode::SUCCESS)
}

pub async fn serve(path: &Path) -> anyhow::Result<ExitCode> {
    let _ = path;
    anyhow::bail!("serve: not implemented yet")
}
