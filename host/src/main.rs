use clap::Parser;
use kwp::config::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if cli.version {
        print!("{}", kwp::version::long());
        return std::process::ExitCode::SUCCESS;
    }
    let (verbosity, format) = match &cli.flags.config {
        Some(path) => kwp::logging::from_config(path),
        None => (None, None),
    };
    kwp::logging::init(
        cli.flags.verbosity.or(verbosity),
        cli.flags.logging_format.or(format),
    );
    if let Some(Command::Inspect { address, json }) = &cli.command {
        return match kwp::inspect::run(address, *json) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Demo { dir, run_for }) => kwp::demo::run(cli.flags, dir, run_for).await,
            Some(Command::Inspect { .. }) => Ok(()),
            None => kwp::app::run(cli.flags).await,
        }
    });
    // Blocking tasks (a plugin compile, a file read) must not hold the
    // exit: give them a moment, then leave.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
