//! Fault injection for tests and benchmarks: latency added to every call, a
//! random share of calls answered `Unavailable`, and a fixed gRPC status for
//! chosen methods. Health checks are never affected.

use std::time::Duration;
use tonic::{Code, Status};

/// The faults a node injects; the default injects none.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Added before every call is handled.
    pub latency: Duration,
    /// Share of calls, between 0 and 1, answered `Unavailable`.
    pub failure_rate: f64,
    /// Calls to these methods always fail with the code.
    pub fail_methods: Vec<FailMethod>,
}

/// `METHOD=CODE`: every call to METHOD answers CODE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailMethod {
    /// A method name (`GarbageCollect`), `Service/Method`, or the full gRPC
    /// path (`/gitaly.RepositoryService/GarbageCollect`).
    pub method: String,
    pub code: Code,
}

impl FailMethod {
    fn matches(&self, path: &str) -> bool {
        let pattern = self.method.trim_start_matches('/');
        let path = path.trim_start_matches('/');
        if pattern.contains('/') {
            // `gitaly.RepositoryService/X` or `RepositoryService/X`.
            path == pattern
                || path
                    .rsplit_once('.')
                    .is_some_and(|(_, tail)| tail == pattern)
        } else {
            path.rsplit_once('/')
                .is_some_and(|(_, method)| method == pattern)
        }
    }
}

impl Faults {
    /// Waits the latency, then says whether the call at `path` must fail.
    pub async fn apply(&self, path: &str) -> Result<(), Status> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if let Some(f) = self.fail_methods.iter().find(|f| f.matches(path)) {
            return Err(Status::new(
                f.code,
                format!("fault injected by --fail-method for {path}"),
            ));
        }
        if self.failure_rate > 0.0 && rand::random_bool(self.failure_rate.min(1.0)) {
            return Err(Status::unavailable(format!(
                "fault injected by --failure-rate for {path}"
            )));
        }
        Ok(())
    }
}

/// Parses `METHOD=CODE`; CODE is a gRPC code name in any case, with or
/// without underscores (`unimplemented`, `NOT_FOUND`, `NotFound`), or its number.
pub fn parse_fail_method(s: &str) -> Result<FailMethod, String> {
    let (method, code) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected METHOD=CODE, e.g. GarbageCollect=unimplemented"))?;
    if method.is_empty() {
        return Err(format!("{s:?}: the method is empty"));
    }
    Ok(FailMethod {
        method: method.to_owned(),
        code: parse_code(code)?,
    })
}

const CODES: [(&str, Code); 16] = [
    ("cancelled", Code::Cancelled),
    ("unknown", Code::Unknown),
    ("invalidargument", Code::InvalidArgument),
    ("deadlineexceeded", Code::DeadlineExceeded),
    ("notfound", Code::NotFound),
    ("alreadyexists", Code::AlreadyExists),
    ("permissiondenied", Code::PermissionDenied),
    ("resourceexhausted", Code::ResourceExhausted),
    ("failedprecondition", Code::FailedPrecondition),
    ("aborted", Code::Aborted),
    ("outofrange", Code::OutOfRange),
    ("unimplemented", Code::Unimplemented),
    ("internal", Code::Internal),
    ("unavailable", Code::Unavailable),
    ("dataloss", Code::DataLoss),
    ("unauthenticated", Code::Unauthenticated),
];

/// A failing gRPC code by name or number (`OK` is not a failure).
pub fn parse_code(s: &str) -> Result<Code, String> {
    let name: String = s
        .chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect();
    let name = if name == "canceled" {
        "cancelled".to_owned()
    } else {
        name
    };
    if let Some((_, code)) = CODES.iter().find(|(n, _)| *n == name) {
        return Ok(*code);
    }
    match s.parse::<i32>() {
        Ok(n) if (1..=16).contains(&n) => Ok(Code::from_i32(n)),
        _ => Err(format!(
            "{s:?} is not a failing gRPC code; use one of: {}",
            CODES.map(|(n, _)| n).join(", ")
        )),
    }
}

/// Parses a failure rate between 0 and 1.
pub fn parse_failure_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a rate between 0 and 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_parse_in_every_spelling() {
        assert_eq!(parse_code("unimplemented"), Ok(Code::Unimplemented));
        assert_eq!(parse_code("NOT_FOUND"), Ok(Code::NotFound));
        assert_eq!(parse_code("NotFound"), Ok(Code::NotFound));
        assert_eq!(parse_code("14"), Ok(Code::Unavailable));
        assert!(parse_code("ok").is_err());
        assert!(parse_code("0").is_err());
        assert!(parse_fail_method("GarbageCollect").is_err());
        assert_eq!(parse_failure_rate("0.25"), Ok(0.25));
        assert!(parse_failure_rate("2").is_err());
    }

    #[test]
    fn methods_match_by_name_service_or_full_path() {
        let path = "/gitaly.RepositoryService/GarbageCollect";
        for m in [
            "GarbageCollect",
            "RepositoryService/GarbageCollect",
            "gitaly.RepositoryService/GarbageCollect",
            "/gitaly.RepositoryService/GarbageCollect",
        ] {
            assert!(
                parse_fail_method(&format!("{m}=internal"))
                    .unwrap()
                    .matches(path),
                "{m}"
            );
        }
        assert!(
            !parse_fail_method("RepackFull=internal")
                .unwrap()
                .matches(path)
        );
        assert!(!parse_fail_method("Collect=internal").unwrap().matches(path));
    }
}
