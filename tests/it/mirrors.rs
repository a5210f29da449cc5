//! Mirrors: containerd's hosts directory and containers' registries.conf route pulls through
//! mirrors, which fall back to the registry when they fail; repository rewrites; and a real
//! pull-through cache (distribution in proxy mode) that answers ranges of blobs it has not
//! stored with the whole blob, which ocifs then streams once.

use crate::builder::{self, Enc, Item, encode, file, noise, push_one};
use crate::conformance::expected_tree;
use crate::fixtures::base_layers;
use crate::harness::{Env, Mount, Proxy, Registry, TempDir, free_port, ocifs};
use crate::oracle;
use crate::stats::{stats, wait_for_verification};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A host directory under `work` configuring `registry` with `hosts_toml`; its path.
fn hosts_dir(work: &TempDir, registry: &str, hosts_toml: &str) -> String {
    let root = work.path().join("certs.d");
    let (host, port) = registry.rsplit_once(':').unwrap();
    let dir = root.join(format!("{host}_{port}_"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hosts.toml"), hosts_toml).unwrap();
    root.to_str().unwrap().to_string()
}

/// A mirror that serves the wrong content under every digest: another blob (with that blob's
/// digest and length in its headers) for blobs, another manifest for manifests.
struct WrongMirror {
    addr: String,
    requests: Arc<AtomicU64>,
}

impl WrongMirror {
    fn start() -> WrongMirror {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(AtomicU64::new(0));
        let counted = requests.clone();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let counted = counted.clone();
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if conn.read(&mut b).unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    let head = String::from_utf8_lossy(&head).to_string();
                    let target = head.split(' ').nth(1).unwrap_or("");
                    let (body, kind): (&[u8], &str) = if target.contains("/manifests/") {
                        (
                            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#,
                            "application/vnd.oci.image.manifest.v1+json",
                        )
                    } else {
                        (
                            b"some other blob, not the one asked for",
                            "application/octet-stream",
                        )
                    };
                    let digest = builder::sha(body);
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: {kind}\r\nDocker-Content-Digest: {digest}\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(body);
                });
            }
        });
        WrongMirror { addr, requests }
    }
}

/// A mirror that answers every request with 503 (keeping the connection open), counting the
/// requests other than the API check (`GET /v2/`, which a mount sends ahead to open
/// connections).
struct Unavailable {
    addr: String,
    requests: Arc<AtomicU64>,
}

impl Unavailable {
    fn start() -> Unavailable {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(AtomicU64::new(0));
        let counted = requests.clone();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let counted = counted.clone();
                std::thread::spawn(move || {
                    loop {
                        let mut head = Vec::new();
                        let mut b = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") {
                            if conn.read(&mut b).unwrap_or(0) == 0 {
                                return;
                            }
                            head.push(b[0]);
                        }
                        if !head.starts_with(b"GET /v2/ ") {
                            counted.fetch_add(1, Ordering::SeqCst);
                        }
                        let answer =
                            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
                        if conn.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Unavailable { addr, requests }
    }
}

#[test]
fn a_mirror_answering_503_is_tried_twice_then_left_alone_while_the_registry_serves() {
    let Some(Env { reg, work }) = Env::new("mirrors-503") else {
        return;
    };
    let layers: Vec<_> = base_layers()
        .into_iter()
        .map(|t| encode(t, Enc::Estargz))
        .collect();
    push_one(work.path(), &layers, &reg.addr, "mirrored/app");
    let mirror = Unavailable::start();
    let hosts = hosts_dir(
        &work,
        &reg.addr,
        &format!(
            "[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            mirror.addr
        ),
    );
    let reference = format!("{}/mirrored/app:v1", reg.addr);
    let flags = ["--hosts-dir", hosts.as_str(), "--registries-conf", "none"];
    let started = std::time::Instant::now();
    let m = Mount::new(&reference, &flags, &[]);
    let (_, expected) = expected_tree(&work, &layers);
    oracle::assert_same(&expected, &oracle::snapshot(m.path()));
    let took = started.elapsed();
    let v = stats(m.path());
    let (at_mirror, at_registry) = (&v.hosts[0], &v.hosts[1]);
    assert!(
        at_mirror.failures >= 1 && at_mirror.bytes == 0 && at_registry.bytes > 0,
        "{:?}",
        v.hosts
    );
    // The mirror has a host to fall back to: each request there is tried once more, not five
    // times more (which took 3-10 s per request), and after a failure the mirror is left
    // alone for 5 s (BUSY_FOR), not asked first again by every request (24 requests for this
    // mount before).
    let asked = mirror.requests.load(Ordering::SeqCst);
    let windows = 1 + took.as_secs() / 5;
    assert!(
        asked <= 2 * at_mirror.failures && at_mirror.failures <= 2 * windows,
        "{asked} requests at the mirror for {} failed ones, in {took:?}",
        at_mirror.failures
    );
}

#[test]
fn mirrors_that_are_down_lack_the_image_or_serve_wrong_content_fall_back() {
    let Some(Env { reg, work }) = Env::new("mirrors-fail") else {
        return;
    };
    let layers: Vec<_> = base_layers()
        .into_iter()
        .map(|t| encode(t, Enc::Gzip))
        .collect();
    push_one(work.path(), &layers, &reg.addr, "mirrored/app");
    let empty = Registry::start(None);
    let wrong = WrongMirror::start();
    let down = free_port();
    let hosts = hosts_dir(
        &work,
        &reg.addr,
        &format!(
            "[host.\"http://127.0.0.1:{down}\"]\n  capabilities = [\"pull\"]\n\
             [host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n\
             [host.\"http://{}\"]\n  capabilities = [\"pull\"]\n",
            empty.addr, wrong.addr
        ),
    );
    let reference = format!("{}/mirrored/app:v1", reg.addr);
    let flags = ["--hosts-dir", hosts.as_str(), "--registries-conf", "none"];
    let m = Mount::new(&reference, &flags, &[]);
    let (_, expected) = expected_tree(&work, &layers);
    oracle::assert_same(&expected, &oracle::snapshot(m.path()));
    assert_eq!(wait_for_verification(&m, 2), ["verified", "verified"]);
    let v = stats(m.path());
    let names: Vec<&str> = v.hosts.iter().map(|h| h.host.as_str()).collect();
    let down_name = format!("127.0.0.1:{down}");
    assert_eq!(
        names,
        [
            down_name.as_str(),
            empty.addr.as_str(),
            wrong.addr.as_str(),
            reg.addr.as_str()
        ]
    );
    for h in &v.hosts[..3] {
        assert_eq!(h.role, "mirror");
        assert!(h.failures >= 1 && h.bytes == 0, "{h:?}");
    }
    assert!(
        v.hosts[2].last_error.as_deref().unwrap().contains("digest"),
        "{v:?}"
    );
    // The wrong mirror was asked once per object, then passed over for it.
    assert!(wrong.requests.load(Ordering::SeqCst) <= 4, "{v:?}");
    let origin = &v.hosts[3];
    for l in &v.layers {
        assert!(origin.served.contains_key(&l.digest), "{origin:?}");
    }
}

#[test]
fn rewrites_and_remapped_locations_map_the_repository_at_the_mirror() {
    let Some(Env { reg: origin, work }) = Env::new("mirrors-rewrite") else {
        return;
    };
    // The image is only at the mirror, under another name: only the mapping finds it. The
    // mirror wants credentials, which are stored for it alone: they must be looked up for
    // the host contacted, not for the registry the reference names.
    let mirror = Registry::start(Some(("alice", "wonder")));
    let layers: Vec<_> = base_layers()
        .into_iter()
        .map(|t| encode(t, Enc::Estargz))
        .collect();
    let dir = builder::layout(
        &work.path().join("layout"),
        "v1",
        &[("linux", "amd64", None, &layers)],
    );
    builder::push(
        &dir,
        "v1",
        &mirror.addr,
        "hub/team/app",
        Some("alice:wonder"),
    );
    let auth = work.path().join("auth.json");
    crate::harness::write_docker_config(&auth, &mirror.addr, "alice:wonder");
    let env = [("REGISTRY_AUTH_FILE", auth.to_str().unwrap())];
    let reference = format!("{}/team/app:v1", origin.addr);
    let hosts = hosts_dir(
        &work,
        &origin.addr,
        &format!(
            "[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  rewrite = {{ \"^nothing$\" = \"x\", \"^team/(.*)$\" = \"hub/team/$1\" }}\n",
            mirror.addr
        ),
    );
    let m = Mount::new(
        &reference,
        &["--hosts-dir", hosts.as_str(), "--registries-conf", "none"],
        &env,
    );
    assert!(m.ready.contains(&reference), "{}", m.ready);
    let (_, expected) = expected_tree(&work, &layers);
    oracle::assert_same(&expected, &oracle::snapshot(m.path()));
    let v = stats(m.path());
    assert_eq!(v.hosts[0].repository, "hub/team/app");
    assert!(
        v.hosts[0].bytes > 0 && v.hosts[1].bytes == 0,
        "{:?}",
        v.hosts
    );
    drop(m);

    // The same through registries.conf: a mirror's location replaces the matched prefix.
    let conf = work.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nprefix = \"{}/team\"\nlocation = \"{}/team\"\n\n[[registry.mirror]]\nlocation = \"{}/hub/team\"\n",
            origin.addr, origin.addr, mirror.addr
        ),
    )
    .unwrap();
    let cache = TempDir::new("rewrite-cache");
    let common = [
        "--hosts-dir",
        "none",
        "--registries-conf",
        conf.to_str().unwrap(),
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ];
    let mut args = vec!["cat"];
    args.extend(common);
    args.extend([reference.as_str(), "etc/hostname"]);
    let (ok, out, err) = ocifs(&args, &env);
    assert!(ok, "{err}");
    assert_eq!(out, b"changed\n");
    // `inspect` says which host served what.
    let mut args = vec!["inspect", "--json"];
    args.extend(common);
    args.push(&reference);
    let (ok, out, err) = ocifs(&args, &env);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let hosts = v["hosts"].as_array().unwrap();
    assert_eq!(hosts[0]["host"], mirror.addr.as_str());
    assert_eq!(hosts[0]["repository"], "hub/team/app");
    let digest = v["digest"].as_str().unwrap();
    assert!(hosts[0]["served"][digest].as_u64().unwrap() > 0, "{v}");
    assert_eq!(hosts[1]["bytes"], 0, "{v}");
    // Malformed configuration: a clear error naming file and line.
    std::fs::write(
        &conf,
        "[[registry]]\nlocation = \"x.example\"\nblocked = maybe\n",
    )
    .unwrap();
    let mut args = vec!["ls"];
    args.extend(common);
    args.push(&reference);
    let (ok, _, err) = ocifs(&args, &[]);
    assert!(
        !ok && err.contains(&format!("{}:3", conf.display())),
        "{err}"
    );
}

/// GETs of each blob in a registry's access log: digest -> (requests, bytes written).
fn blob_gets(log: &std::path::Path) -> std::collections::HashMap<String, (u64, u64)> {
    crate::harness::blob_gets_in(&std::fs::read_to_string(log).unwrap(), false)
}

#[test]
fn a_pull_through_cache_serves_mounts_and_the_origin_sends_each_blob_once() {
    let Some(Env { reg: origin, work }) = Env::new("mirrors-proxy") else {
        return;
    };
    // Layers read by ranges from the front (a tar walked header by header, a gzip layer's
    // index pass): without a whole stream, each read of a cold blob at the cache is one more
    // download from the origin.
    let mut items = vec![Item::Dir("data", 0o755)];
    for i in 0..48 {
        items.push(file(&format!("data/f{i:02}"), noise(100_000, i)));
    }
    let layers = vec![
        encode(builder::tar(&items), Enc::Tar),
        encode(base_layers().remove(0), Enc::Gzip),
    ];
    push_one(work.path(), &layers, &origin.addr, "cached/app");
    // The link to the origin is slow enough that the cache is still fetching a blob when
    // the next reads of it come.
    let link = Proxy::with_link(
        &origin.addr,
        None,
        Some((Duration::from_millis(2), 3 << 20)),
    );
    let cache = Registry::pull_through(&link.addr);
    let reference = format!("{}/cached/app:v1", link.addr);
    let hosts = hosts_dir(
        &work,
        &link.addr,
        &format!(
            "[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            cache.addr
        ),
    );
    let flags = ["--hosts-dir", hosts.as_str(), "--registries-conf", "none"];
    let (_, expected) = expected_tree(&work, &layers);
    let m = Mount::new(&reference, &flags, &[]);
    oracle::assert_same(&expected, &oracle::snapshot(m.path()));
    assert_eq!(wait_for_verification(&m, 2), ["verified", "verified"]);
    let v = stats(m.path());
    let mirror = &v.hosts[0];
    // Each blob's first answer was whole; ocifs hung up and waited for the cache to store it.
    assert_eq!(mirror.whole_streams, 0, "{mirror:?}");
    assert_eq!(mirror.waited_for_store, 2, "{mirror:?}");
    assert_eq!(
        v.hosts[1].bytes, 0,
        "nothing from the origin directly: {:?}",
        v.hosts[1]
    );
    drop(m);
    // What crossed the link: each blob once (the cache's store), and of each answer the
    // cache streamed meanwhile only what came before ocifs hung up. (The origin's own log
    // counts more: what it wrote into loopback socket buffers before the link took it.)
    let total: u64 = layers.iter().map(|l| l.blob.len() as u64).sum();
    let crossed = link.blob_bytes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        crossed >= total && crossed <= total + total / 4,
        "{crossed} blob bytes crossed the link for {total} bytes of blobs"
    );
    let log = origin.dir.path().join("registry.log");
    let first = blob_gets(&log);
    // A second node: the cache has every blob and answers ranges; the origin sends nothing.
    let m = Mount::new(&reference, &flags, &[]);
    oracle::assert_same(&expected, &oracle::snapshot(m.path()));
    let v = stats(m.path());
    assert_eq!(v.hosts[0].whole_streams, 0, "{:?}", v.hosts[0]);
    drop(m);
    let second = blob_gets(&log);
    for l in &layers {
        let digest = builder::sha(&l.blob);
        assert_eq!(
            first.get(&digest),
            second.get(&digest),
            "blob {digest} fetched again"
        );
    }
}
