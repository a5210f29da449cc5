//! Credentials: Basic auth, credential helpers, Bearer tokens and their refresh, and blob
//! redirects to storage that must not see the registry's credentials.

use crate::builder::{self, Enc, encode, file, layout, noise, push};
use crate::harness::{self, Env, Mount, Proxy, Registry, ocifs};
use std::sync::atomic::Ordering;

#[test]
fn bearer_token_and_basic_auth() {
    let Some(Env { reg: open, work }) = Env::without_fuse("auth") else {
        return;
    };
    let layers = vec![encode(
        builder::tar(&[file("secret", "s3cret\n")]),
        Enc::Gzip,
    )];
    let dir = layout(
        &work.path().join("layout"),
        "v1",
        &[("linux", "amd64", None, &layers)],
    );

    // Basic auth on the registry itself (htpasswd).
    let reg = Registry::start(Some(("alice", "wonder")));
    push(&dir, "v1", &reg.addr, "private/image", Some("alice:wonder"));
    let config = work.path().join("config.json");
    let write_cfg =
        |host: &str, user_pass: &str| harness::write_docker_config(&config, host, user_pass);
    let cfg = config.to_str().unwrap().to_string();
    let cd = work.path().join("cache");
    let cd = cd.to_str().unwrap().to_string();
    let r = format!("{}/private/image:v1", reg.addr);
    write_cfg(&reg.addr, "alice:wonder");
    let (ok, out, err) = ocifs(
        &["cat", "--cache-dir", &cd, &r, "secret"],
        &[("REGISTRY_AUTH_FILE", &cfg)],
    );
    assert!(ok, "basic: {err}");
    assert_eq!(out, b"s3cret\n");
    write_cfg(&reg.addr, "alice:wrong");
    let (ok, _, err) = ocifs(
        &["ls", "--cache-dir", &cd, &r],
        &[("REGISTRY_AUTH_FILE", &cfg)],
    );
    assert!(!ok && err.contains("unauthorized"), "{err}");
    let (ok, _, err) = ocifs(&["ls", "--cache-dir", &cd, &r], &[]);
    assert!(
        !ok && err.contains("unauthorized") && err.contains("credentials"),
        "{err}"
    );
    // Credential helpers: `credHelpers` for this host, then `credsStore`, as Docker does.
    // The helper checks it is asked about this registry and answers alice's password.
    let bin = work.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let helper = bin.join("docker-credential-ocifstest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 2\nread -r server\n[ \"$server\" = \"{}\" ] || {{ echo 'credentials not found in native keychain'; exit 1; }}\necho '{{\"ServerURL\":\"'$server'\",\"Username\":\"alice\",\"Secret\":\"wonder\"}}'\n",
            reg.addr
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for cfg_json in [
        format!(r#"{{"credHelpers":{{"{}":"ocifstest"}}}}"#, reg.addr),
        r#"{"credsStore":"ocifstest","auths":{}}"#.to_string(),
    ] {
        std::fs::write(&config, &cfg_json).unwrap();
        let (ok, out, err) = ocifs(
            &["cat", "--cache-dir", &cd, &r, "secret"],
            &[("REGISTRY_AUTH_FILE", &cfg), ("PATH", &path)],
        );
        assert!(ok && out == b"s3cret\n", "helper via {cfg_json}: {err}");
    }
    // A helper that has nothing for this registry: anonymous, refused by the registry.
    std::fs::write(&config, r#"{"credsStore":"ocifstest"}"#).unwrap();
    let other = format!("localhost:{}", reg.addr.rsplit(':').next().unwrap());
    let (ok, _, err) = ocifs(
        &[
            "ls",
            "--cache-dir",
            &cd,
            &format!("{other}/private/image:v1"),
        ],
        &[("REGISTRY_AUTH_FILE", &cfg), ("PATH", &path)],
    );
    assert!(!ok && err.contains("unauthorized"), "{err}");

    // Bearer tokens from a token endpoint in front of an open registry.
    push(&dir, "v1", &open.addr, "private/image", None);
    let proxy = Proxy::start(&open.addr, Some(("bob", "builder")));
    let r = format!("{}/private/image:v1", proxy.addr);
    write_cfg(&proxy.addr, "bob:builder");
    let (ok, out, err) = ocifs(
        &["cat", "--cache-dir", &cd, &r, "secret"],
        &[("REGISTRY_AUTH_FILE", &cfg)],
    );
    assert!(ok, "bearer: {err}");
    assert_eq!(out, b"s3cret\n");
    let issued = proxy.tokens_issued.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&issued),
        "tokens are cached per scope, issued {issued}"
    );
    write_cfg(&proxy.addr, "bob:nope");
    let (ok, _, err) = ocifs(
        &["cat", "--cache-dir", &cd, &r, "secret"],
        &[("REGISTRY_AUTH_FILE", &cfg)],
    );
    assert!(
        !ok && err.contains("unauthorized") && err.contains("token server"),
        "{err}"
    );
}

#[test]
fn blob_redirects_are_followed_without_credentials_reused_and_renewed() {
    let Some(Env { reg, work }) = Env::without_fuse("redirect") else {
        return;
    };
    // A filler between the two files keeps read-ahead of a.bin away from b.bin's blocks.
    let tar = builder::tar(&[
        file("a.bin", noise(3 << 20, 21)),
        file("filler", vec![0u8; 10 << 20]),
        file("b.bin", noise(3 << 20, 22)),
    ]);
    let layers = vec![encode(tar, Enc::Tar)];
    builder::push_one(work.path(), &layers, &reg.addr, "redir/image");
    let proxy = Proxy::with_storage(&reg.addr, Some(("carol", "secret")));
    let st = proxy.storage.clone().unwrap();
    let config = work.path().join("config.json");
    harness::write_docker_config(&config, &proxy.addr, "carol:secret");
    let cfg = config.to_str().unwrap();
    let r = format!("{}/redir/image:v1", proxy.addr);
    let m = Mount::new(&r, &["--verify", "off"], &[("REGISTRY_AUTH_FILE", cfg)]);
    assert_eq!(
        builder::sha(&std::fs::read(m.path().join("a.bin")).unwrap()),
        builder::sha(&noise(3 << 20, 21))
    );
    let (redirects, requests) = (
        st.redirects.load(Ordering::SeqCst),
        st.requests.load(Ordering::SeqCst),
    );
    assert!(
        requests > redirects,
        "the storage URL is reused: {redirects} redirects for {requests} storage requests"
    );
    // The presigned URL expires: the next read goes back to the registry for a fresh one.
    st.signature.fetch_add(1, Ordering::SeqCst);
    assert_eq!(
        builder::sha(&std::fs::read(m.path().join("b.bin")).unwrap()),
        builder::sha(&noise(3 << 20, 22))
    );
    assert!(
        st.expired.load(Ordering::SeqCst) >= 1,
        "an expired URL was tried once"
    );
    assert!(
        st.redirects.load(Ordering::SeqCst) > redirects,
        "and a fresh one obtained"
    );
    assert_eq!(
        st.auth_leaks.load(Ordering::SeqCst),
        0,
        "registry credentials never reach storage"
    );
}

#[test]
fn bearer_tokens_are_refreshed_before_they_lapse() {
    let Some(Env { reg, work }) = Env::new("refresh") else {
        return;
    };
    let tar = builder::tar(&[
        file("a", noise(3 << 20, 41)),
        file("pad", vec![0u8; 8 << 20]),
        file("b", noise(3 << 20, 42)),
    ]);
    builder::push_one(
        work.path(),
        &[encode(tar, Enc::Tar)],
        &reg.addr,
        "refresh/image",
    );
    let proxy = Proxy::start(&reg.addr, Some(("dave", "pw")));
    proxy.token_ttl.store(1, Ordering::SeqCst);
    let config = work.path().join("config.json");
    harness::write_docker_config(&config, &proxy.addr, "dave:pw");
    let m = Mount::new(
        &format!("{}/refresh/image:v1", proxy.addr),
        &["--verify", "off"],
        &[("REGISTRY_AUTH_FILE", config.to_str().unwrap())],
    );
    let (tokens, challenges) = (
        proxy.tokens_issued.load(Ordering::SeqCst),
        proxy.challenges.load(Ordering::SeqCst),
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        builder::sha(&std::fs::read(m.path().join("b")).unwrap()),
        builder::sha(&noise(3 << 20, 42))
    );
    assert!(
        proxy.tokens_issued.load(Ordering::SeqCst) > tokens,
        "a fresh token was fetched"
    );
    assert_eq!(
        proxy.challenges.load(Ordering::SeqCst),
        challenges,
        "before the old one was refused, not after a 401"
    );
}
