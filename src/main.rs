//! The `gitaly-replicator` command line: parse (exit 64 on a usage error),
//! load config (exit 64 when it is bad, before touching the network), set up
//! logging, run one command.

mod cli;

// glibc's malloc took a quarter of the consumer's CPU time under load (many
// small, short-lived allocations across threads); with mimalloc the pipeline
// benchmark's maintenance and update rates rose by about 20 % and 80 %.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use std::process::ExitCode;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (the Rust bindings
/// name no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long (ms) the allocator keeps freed memory before handing it back to
/// the kernel, unless `MIMALLOC_PURGE_DELAY` says otherwise. mimalloc's own
/// second let the consumer's peak RSS in a 1M drain grow by about 8 MiB;
/// handing back at once (0) made the consumer spend about an eighth of its
/// CPU per job returning and refaulting pages it would have reused; 10 ms
/// saves that for under 1 MiB (docs/performance.md, Memory).
const PURGE_DELAY_MS: std::os::raw::c_long = 10;

/// Sets the allocator's purge delay to [`PURGE_DELAY_MS`];
/// `MIMALLOC_PURGE_DELAY` in the environment still decides when set.
fn set_purge_delay() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: main's first statement, before any other thread exists
        // (mi_option_set is not thread-safe); the option is a plain integer.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

fn main() -> ExitCode {
    set_purge_delay();
    let args = match cli::Args::try_parse() {
        Ok(args) => args,
        Err(e) => return cli::parse_error(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gitaly-replicator: cannot start the async runtime: {e}");
            return ExitCode::from(70);
        }
    };
    runtime.block_on(cli::dispatch(args))
}

#[cfg(test)]
mod tests {
    use super::MI_OPTION_PURGE_DELAY;

    #[test]
    fn the_purge_delay_option_index_names_mimallocs_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // Of mimalloc 3's options only purge_delay defaults to 1000 (ms): a
        // wrong index reads another option's default.
        // SAFETY: reading an option; no other test sets one.
        let delay = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(delay, 1000);
    }
}
