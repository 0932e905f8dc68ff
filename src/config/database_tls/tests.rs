//! The trust rule, mode by mode and root by root.

use super::*;
use std::str::FromStr;

fn options(mode: &str) -> PgConnectOptions {
    PgConnectOptions::from_str(&format!("postgres://u@db.internal:5433/x?sslmode={mode}")).unwrap()
}

fn settings(rootcert: Option<&str>) -> TlsSettings {
    TlsSettings {
        rootcert: rootcert.map(str::to_owned),
        ..TlsSettings::default()
    }
}

const HOME_ROOT: &str = "/home/git/.postgresql/root.crt";

/// `decide` with `present` the files that exist.
fn trust(mode: &str, rootcert: Option<&str>, present: &[&str]) -> Result<ServerTrust, String> {
    decide(
        &options(mode),
        settings(rootcert),
        "database.",
        Some(PathBuf::from(HOME_ROOT)),
        |p| present.iter().any(|f| Path::new(f) == p),
    )
    .map_err(|e| e.to_string())
}

fn roots(t: &Result<ServerTrust, String>) -> Option<(Roots, bool)> {
    match t {
        Ok(ServerTrust::Verified(v)) => Some((v.roots.clone(), v.check_host)),
        _ => None,
    }
}

fn file(p: &str) -> Roots {
    Roots::Pem(Pem::File(PathBuf::from(p)))
}

#[test]
fn a_root_file_is_the_only_anchor_of_the_verifying_modes_as_in_libpq() {
    let ca = "/etc/pg/ca.pem";
    // mode, sslrootcert, the files that exist, the roots and the host check.
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        &'a [&'a str],
        Option<(Roots, bool)>,
    );
    let cases: &[Case] = &[
        // Named: used whether or not it exists (reading it tells).
        ("verify-ca", Some(ca), &[], Some((file(ca), false))),
        ("verify-full", Some(ca), &[ca], Some((file(ca), true))),
        // Unset: libpq's default file, when it exists.
        (
            "verify-ca",
            None,
            &[HOME_ROOT],
            Some((file(HOME_ROOT), false)),
        ),
        (
            "verify-full",
            None,
            &[HOME_ROOT],
            Some((file(HOME_ROOT), true)),
        ),
        // `require` verifies the chain against a root file that exists.
        ("require", Some(ca), &[ca], Some((file(ca), false))),
        (
            "require",
            None,
            &[HOME_ROOT],
            Some((file(HOME_ROOT), false)),
        ),
        ("require", Some(ca), &[], None),
        ("require", None, &[], None),
        // Never verified.
        ("prefer", Some(ca), &[ca, HOME_ROOT], None),
        ("allow", Some(ca), &[ca], None),
        ("disable", None, &[HOME_ROOT], None),
        // The platform's roots, with the host name.
        (
            "verify-full",
            Some("system"),
            &[],
            Some((Roots::System, true)),
        ),
    ];
    for (mode, rootcert, present, want) in cases {
        let got = trust(mode, *rootcert, present);
        assert!(got.is_ok(), "{mode} {rootcert:?}: {got:?}");
        assert_eq!(&roots(&got), want, "{mode} {rootcert:?} with {present:?}");
    }
}

#[test]
fn system_roots_need_verify_full_and_the_error_names_both_keys() {
    for mode in ["verify-ca", "require", "prefer", "disable"] {
        let e = trust(mode, Some("system"), &[]).unwrap_err();
        assert!(e.starts_with("database.sslrootcert: "), "{e}");
        assert!(e.contains("database.sslmode = \"verify-full\""), "{e}");
        assert!(e.contains(&format!("not \"{mode}\"")), "{e}");
    }
}

#[test]
fn verifying_without_any_root_file_is_refused_as_libpq_does() {
    for mode in ["verify-ca", "verify-full"] {
        let e = trust(mode, None, &[]).unwrap_err();
        assert!(
            e.contains(&format!("root certificate file {HOME_ROOT} does not exist")),
            "{e}"
        );
        assert!(
            e.contains("set database.sslrootcert to a file, or to \"system\""),
            "{e}"
        );
    }
}

#[test]
fn the_relay_dials_hostaddr_checks_host_and_keeps_the_client_certificate() {
    let s = TlsSettings {
        rootcert: Some("/ca.pem".into()),
        cert: Some("/c.pem".into()),
        key: Some("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----".into()),
        hostaddr: Some("10.0.0.5".parse().unwrap()),
    };
    let t = decide(
        &options("verify-full"),
        s,
        "database.session_pooled.",
        None,
        |_| false,
    );
    let Ok(ServerTrust::Verified(v)) = t else {
        panic!("{t:?}")
    };
    assert_eq!((v.host.as_str(), v.port), ("db.internal", 5433));
    assert_eq!(v.hostaddr, Some("10.0.0.5".parse().unwrap()));
    assert_eq!(v.client_cert, Some(Pem::File("/c.pem".into())));
    assert!(matches!(v.client_key, Some(Pem::Inline(_))));
    // Inline PEM may be a key: never shown.
    assert_eq!(format!("{:?}", v.client_key), "Some([inline PEM])");
    assert_eq!(v.keys, "database.session_pooled.");
}

#[test]
fn a_unix_socket_is_left_to_sqlx_as_libpq_uses_no_tls_there() {
    let o = options("verify-full").socket("/var/run/postgresql");
    let t = decide(&o, settings(Some("/ca.pem")), "database.", None, |_| true);
    assert_eq!(t.unwrap(), ServerTrust::Unverified);
}

#[test]
fn keys_come_before_the_url_which_comes_before_the_environment() {
    let env = |var: &str| match var {
        "PGSSLROOTCERT" => Some("/env/ca.pem".to_owned()),
        "PGSSLCERT" => Some("/env/c.pem".to_owned()),
        "PGSSLKEY" => Some("/env/k.pem".to_owned()),
        "PGHOSTADDR" => Some("10.0.0.1".to_owned()),
        _ => None,
    };
    let url = "postgres://u@h/d?ssl-ca=/url/ca.pem&sslcert=/url/c.pem&hostaddr=10.0.0.2";
    let key = Path::new("/key/ca.pem");
    let s = TlsSettings::resolve([Some(key), None, None], Some(url), env);
    assert_eq!(s.rootcert.as_deref(), Some("/key/ca.pem"));
    assert_eq!(s.cert.as_deref(), Some("/url/c.pem"));
    assert_eq!(s.key.as_deref(), Some("/env/k.pem"));
    assert_eq!(s.hostaddr, Some("10.0.0.2".parse().unwrap()));
    let s = TlsSettings::resolve([None, None, None], Some(url), env);
    assert_eq!(s.rootcert.as_deref(), Some("/url/ca.pem"));
    let s = TlsSettings::resolve([None, None, None], None, env);
    assert_eq!(s.rootcert.as_deref(), Some("/env/ca.pem"));
    assert_eq!(s.hostaddr, Some("10.0.0.1".parse().unwrap()));
}
