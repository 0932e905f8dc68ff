//! An error and its causes as one line, each cause named once. Many errors
//! here quote their source in their own message, so that a log field read
//! alone says why; walking the chain as well would repeat it (anyhow's `{:#}`
//! does).

use std::error::Error;

/// `error: cause: cause…`, leaving out a cause whose text is already there.
/// A cause written `what: why`, where `why` is its own cause's text, adds
/// only `what` (and nothing when that is there already): `why` comes next.
pub fn display_error_chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        let next = cause.source().map(ToString::to_string);
        let own = next
            .as_deref()
            .and_then(|why| cause_text.strip_suffix(why))
            .and_then(|what| what.strip_suffix(": "))
            .filter(|what| !what.is_empty());
        let new = match own {
            Some(what) if text.contains(&cause_text) || text.contains(what) => None,
            Some(what) => Some(what),
            None if text.contains(&cause_text) => None,
            None => Some(cause_text.as_str()),
        };
        if let Some(new) = new {
            text.push_str(": ");
            text.push_str(new);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot connect to X: {source}")]
    struct Quoting {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("run")]
    struct Silent {
        #[source]
        source: Quoting,
    }

    /// Says its kind and its cause, as async-nats's errors do.
    #[derive(Debug, thiserror::Error)]
    #[error("authorization violation: {source}")]
    struct KindAndCause {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot connect: {cause}")]
    struct Summing {
        cause: String,
        #[source]
        source: KindAndCause,
    }

    #[test]
    fn a_cause_that_repeats_its_own_cause_adds_only_what_is_new() {
        let inner = || std::io::Error::other("nats: authorization violation");
        let e = Summing {
            cause: "nats: authorization violation".into(),
            source: KindAndCause { source: inner() },
        };
        assert_eq!(
            display_error_chain(&e),
            "cannot connect: nats: authorization violation"
        );
        let e = anyhow::Error::new(KindAndCause { source: inner() }).context("status");
        assert_eq!(
            display_error_chain(e.as_ref()),
            "status: authorization violation: nats: authorization violation"
        );
    }

    #[test]
    fn each_cause_is_named_once() {
        let e = Silent {
            source: Quoting {
                source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
            },
        };
        assert_eq!(display_error_chain(&e), "run: cannot connect to X: refused");
        let anyhow = anyhow::Error::new(e.source).context("status");
        assert_eq!(
            display_error_chain(anyhow.as_ref()),
            "status: cannot connect to X: refused"
        );
    }
}
