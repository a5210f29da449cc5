//! TLS and credentials as containers tools do them: a registry with a certificate from a CA
//! the test makes (trusted through `--cert-dir`), one that wants a client certificate, the
//! one-line errors of a wrong CA, an expired certificate, a missing client certificate and
//! https to a plain-HTTP registry, and `--creds`, `--authfile` and
//! `$XDG_RUNTIME_DIR/containers/auth.json`.

use crate::builder::{self, Enc, encode, file, layout};
use crate::harness::{self, Env, Registry, TempDir, ocifs};
use std::path::Path;
use std::process::Command;

/// Runs openssl in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`NAME.crt`, `NAME.key`).
fn ca(dir: &Path, name: &str) {
    crate::harness::self_signed(
        &dir.join(format!("{name}.key")),
        &dir.join(format!("{name}.crt")),
        &format!("/CN=ocifs test {name}"),
        &[
            "basicConstraints=critical,CA:TRUE",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A certificate `NAME.crt`/`NAME.key` for 127.0.0.1 signed by the CA `by`, valid for `days`
/// (negative: expired).
fn cert(dir: &Path, name: &str, by: &str, days: &str) {
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{by}.crt"),
            "-CAkey",
            &format!("{by}.key"),
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            days,
            "-extfile",
            "ext",
        ],
    );
}

/// A registry serving `pki/NAME.crt` over TLS (asking for client certificates signed by
/// `pki/client-ca.crt` when `client_cas`), with one image pushed.
fn tls_registry(work: &Path, pki: &Path, name: &str, client_cas: bool) -> Registry {
    let mut tls = format!(
        "  tls:\n    certificate: {0}/{name}.crt\n    key: {0}/{name}.key\n",
        pki.display()
    );
    if client_cas {
        tls += &format!("    clientcas:\n      - {}/client-ca.crt\n", pki.display());
    }
    let reg = Registry::start_with(None, &tls);
    let layers = vec![encode(builder::tar(&[file("hello", "tls\n")]), Enc::Gzip)];
    let dir = layout(
        &work.join(format!("layout-{name}-{client_cas}")),
        "v1",
        &[("linux", "amd64", None, &layers)],
    );
    // skopeo with the client certificate (the same directory layout: *.cert + *.key).
    let certs = work.join(format!("skopeo-certs-{name}"));
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(pki.join("client.crt"), certs.join("client.cert")).unwrap();
    std::fs::copy(pki.join("client.key"), certs.join("client.key")).unwrap();
    let cert_flags = [std::ffi::OsStr::new("--dest-cert-dir"), certs.as_os_str()];
    builder::push_with(&dir, "v1", &reg.addr, "tls/image", &cert_flags);
    reg
}

/// A `--cert-dir` with the given files of `pki` (renamed).
fn cert_dir(work: &Path, name: &str, files: &[(&str, &str)], pki: &Path) -> String {
    let d = work.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for (from, to) in files {
        std::fs::copy(pki.join(from), d.join(to)).unwrap();
    }
    d.to_str().unwrap().to_string()
}

#[test]
fn tls_registries_with_a_test_ca_and_client_certificates() {
    let Some(Env { reg: plain, work }) = Env::without_fuse("tls") else {
        return;
    };
    if !harness::require(&["openssl"], false) {
        return;
    }
    let pki = work.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    ca(&pki, "ca");
    ca(&pki, "other-ca");
    ca(&pki, "client-ca");
    cert(&pki, "server", "ca", "2");
    cert(&pki, "expired", "ca", "-1");
    cert(&pki, "client", "client-ca", "2");
    let w = work.path();
    let cd = w.join("cache");
    let cd = cd.to_str().unwrap();
    let trusted = cert_dir(w, "trusted", &[("ca.crt", "ca.crt")], &pki);
    let wrong = cert_dir(w, "wrong", &[("other-ca.crt", "ca.crt")], &pki);
    let with_client = cert_dir(
        w,
        "with-client",
        &[
            ("ca.crt", "ca.crt"),
            ("client.crt", "client.cert"),
            ("client.key", "client.key"),
        ],
        &pki,
    );
    let cat = |r: &str, extra: &[&str]| {
        let mut args = vec!["cat", "--cache-dir", cd];
        args.extend_from_slice(extra);
        args.extend([r, "hello"]);
        let (ok, out, err) = ocifs(&args, &[]);
        (ok && out == b"tls\n", err)
    };
    let one_line_error = |r: &str, extra: &[&str], want: &str| {
        let (ok, err) = cat(r, extra);
        assert!(!ok, "{extra:?} worked");
        assert!(err.contains(want), "{extra:?}: want {want:?} in {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            !err.contains("InvalidCertificate") && !err.contains("os error"),
            "{err}"
        );
    };
    // Refused in the handshake (a certificate, a plain-HTTP server): said at once, not tried
    // again, since each try fails the same way. (A refused client certificate may show as a
    // reset connection first, which is tried again.)
    let said_at_once = |r: &str, extra: &[&str]| {
        let mut args = vec!["cat", "--cache-dir", cd];
        args.extend_from_slice(extra);
        args.extend([r, "hello"]);
        let (ok, _, log) = ocifs(&args, &[("OCIFS_LOG", "warn")]);
        assert!(!ok, "{extra:?} worked");
        assert!(
            !log.contains("trying again"),
            "{extra:?} was retried: {log}"
        );
    };

    // localhost answers TLS: https, with our CA from --cert-dir.
    let reg = tls_registry(w, &pki, "server", false);
    let r = format!("{}/tls/image:v1", reg.addr);
    let (ok, err) = cat(&r, &["--cert-dir", &trusted]);
    assert!(ok, "{err}");
    // Over HTTP/2, which a registry offers over TLS (one connection, many streams).
    let log = std::fs::read_to_string(reg.dir.path().join("registry.log")).unwrap();
    // (The access log's lines: `IP - - [time] "GET /v2/ HTTP/2.0" 200 2 "" "ocifs/0.1.0"`.)
    let ours = log
        .lines()
        .filter(|l| l.contains("] \"") && l.contains("\"ocifs/"));
    assert!(
        ours.clone().count() > 0 && ours.clone().all(|l| l.contains("HTTP/2.0")),
        "{log}"
    );
    one_line_error(&r, &[], "not signed by an authority we trust");
    said_at_once(&r, &[]);
    one_line_error(
        &r,
        &["--cert-dir", &wrong],
        "not signed by an authority we trust",
    );
    let (ok, err) = cat(&r, &["--tls-verify=false"]);
    assert!(ok, "--tls-verify=false: {err}");

    // An expired certificate.
    let expired = tls_registry(w, &pki, "expired", false);
    let r = format!("{}/tls/image:v1", expired.addr);
    one_line_error(&r, &["--cert-dir", &trusted], "has expired");
    let (ok, err) = cat(&r, &["--tls-verify=false"]);
    assert!(ok, "--tls-verify=false: {err}");

    // A registry that wants a client certificate.
    let mtls = tls_registry(w, &pki, "server", true);
    let r = format!("{}/tls/image:v1", mtls.addr);
    let (ok, err) = cat(&r, &["--cert-dir", &with_client]);
    assert!(ok, "client certificate: {err}");
    one_line_error(&r, &["--cert-dir", &trusted], "client certificate");

    // https to a plain-HTTP registry, asked for explicitly.
    let builder_layers = vec![encode(builder::tar(&[file("hello", "tls\n")]), Enc::Gzip)];
    builder::push_one(w, &builder_layers, &plain.addr, "tls/image");
    let r = format!("{}/tls/image:v1", plain.addr);
    one_line_error(&r, &["--tls-verify=true"], "does not speak TLS");
    said_at_once(&r, &["--tls-verify=true"]);
    let (ok, err) = cat(&r, &[]);
    assert!(ok, "plain HTTP on localhost: {err}");
}

#[test]
fn credentials_from_flags_and_auth_files() {
    let Some(Env { reg: _, work }) = Env::without_fuse("creds") else {
        return;
    };
    let reg = Registry::start(Some(("alice", "wonder")));
    let layers = vec![encode(
        builder::tar(&[file("secret", "s3cret\n")]),
        Enc::Gzip,
    )];
    let dir = layout(
        &work.path().join("layout"),
        "v1",
        &[("linux", "amd64", None, &layers)],
    );
    builder::push(&dir, "v1", &reg.addr, "team/app", Some("alice:wonder"));
    let r = format!("{}/team/app:v1", reg.addr);
    let cd = work.path().join("cache");
    let cd = cd.to_str().unwrap();
    let cat = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["cat", "--cache-dir", cd];
        args.extend_from_slice(extra);
        args.extend([r.as_str(), "secret"]);
        let (ok, out, err) = ocifs(&args, env);
        (ok && out == b"s3cret\n", err)
    };
    let (ok, err) = cat(&["--creds", "alice:wonder"], &[]);
    assert!(ok, "--creds: {err}");
    let (ok, err) = cat(&["--creds", "alice:wrong"], &[]);
    assert!(!ok && err.contains("unauthorized"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let (ok, err) = cat(&[], &[]);
    assert!(
        !ok && err.contains("--creds"),
        "says how to give credentials: {err}"
    );

    // containers' auth.json: --authfile, and the default under $XDG_RUNTIME_DIR, where a
    // namespace's entry wins over the host's.
    let auth = work.path().join("auth.json");
    harness::write_docker_config(&auth, &reg.addr, "alice:wonder");
    let (ok, err) = cat(&["--authfile", auth.to_str().unwrap()], &[]);
    assert!(ok, "--authfile: {err}");
    let runtime = TempDir::new("xdg-runtime");
    std::fs::create_dir_all(runtime.path().join("containers")).unwrap();
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    std::fs::write(
        runtime.path().join("containers/auth.json"),
        format!(
            r#"{{"auths":{{"{0}":{{"auth":"{1}"}},"{0}/team":{{"auth":"{2}"}}}}}}"#,
            reg.addr,
            b64("alice:wrong"),
            b64("alice:wonder")
        ),
    )
    .unwrap();
    let xdg = runtime.path().to_str().unwrap();
    let (ok, err) = cat(&[], &[("XDG_RUNTIME_DIR", xdg)]);
    assert!(ok, "$XDG_RUNTIME_DIR/containers/auth.json: {err}");
    let (ok, err) = cat(&["--authfile", "/nonexistent/auth.json"], &[]);
    assert!(!ok && err.contains("/nonexistent/auth.json"), "{err}");
}
