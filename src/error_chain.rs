//! An error and its causes as one line, each cause named once. Many errors
//! here quote their source in their own message, so that a log field read
//! alone says why; walking the chain as well would repeat it (anyhow's `{:#}`
//! does).

use std::error::Error;

/// `error: cause: cause…`, leaving out a cause whose text is already there.
pub fn display_error_chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
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
