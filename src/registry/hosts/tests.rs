use super::*;

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ocifs-hosts-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn parsed(text: &str) -> Result<Vec<Host>> {
    parse(
        Path::new("/etc/containerd/certs.d/docker.io/hosts.toml"),
        text,
        "docker.io",
        false,
    )
}

#[test]
fn every_field_of_a_hosts_toml() {
    let text = r#"
server = "https://docker.io"
capabilities = ["pull", "resolve", "push"]

[host."https://mirror-a.example"]
  capabilities = ["pull"]
  ca = "mirror.crt"
  skip_verify = true
  dial_timeout = "1.5s"
  rewrite = { "^library/(.*)" = "hub/$1", "^(.*)$" = "all/$1" }
  [host."https://mirror-a.example".header]
    x-one = "1"
    x-many = ["a", "b"]

[host."http://mirror-b.example:5000/v2/up"]
  capabilities = ["pull", "resolve"]
  override_path = true
  ca = ["/abs/a.pem", "rel/b.pem"]
  client = [["/c/client.cert", "/c/client.key"], ["/c/both.pem", ""]]

[host."mirror-c.example/prefix"]
  client = "c.pem"
  [host."mirror-c.example/prefix".rewrite]
    "^x/(?P<rest>.*)$" = "y/${rest}"
"#;
    let hosts = parsed(text).unwrap();
    let names: Vec<String> = hosts.iter().map(|h| h.endpoint.api()).collect();
    assert_eq!(
        names,
        [
            "https://mirror-a.example/v2",
            "http://mirror-b.example:5000/v2/up",
            "https://mirror-c.example/prefix/v2",
            "https://registry-1.docker.io/v2",
        ]
    );
    assert_eq!(
        hosts.iter().map(|h| h.mirror).collect::<Vec<_>>(),
        [true, true, true, false]
    );
    let [a, b, c, server] = &hosts[..] else {
        unreachable!()
    };
    let base = Path::new("/etc/containerd/certs.d/docker.io");
    assert_eq!(a.caps, Capabilities::PULL);
    assert_eq!(a.endpoint.tls.ca, [base.join("mirror.crt")]);
    assert!(a.endpoint.tls.skip_verify);
    assert_eq!(a.endpoint.dial_timeout, Some(Duration::from_millis(1500)));
    assert_eq!(
        a.endpoint.headers,
        [
            ("x-one".to_string(), "1".to_string()),
            ("x-many".into(), "a".into()),
            ("x-many".into(), "b".into())
        ]
    );
    // Rules in file order; the first that matches applies.
    assert_eq!(
        Rewrite::apply(&a.rewrites, "library/alpine").unwrap(),
        "hub/alpine"
    );
    assert_eq!(Rewrite::apply(&a.rewrites, "me/app").unwrap(), "all/me/app");
    assert_eq!(b.caps, Capabilities::PULL_RESOLVE);
    assert_eq!(
        b.endpoint.tls.ca,
        [PathBuf::from("/abs/a.pem"), base.join("rel/b.pem")]
    );
    assert_eq!(
        b.endpoint.tls.client,
        [
            (
                PathBuf::from("/c/client.cert"),
                Some(PathBuf::from("/c/client.key"))
            ),
            (PathBuf::from("/c/both.pem"), None)
        ]
    );
    assert!(!b.endpoint.tls.skip_verify);
    assert_eq!(c.caps, Capabilities::ALL);
    assert_eq!(c.endpoint.tls.client, [(base.join("c.pem"), None)]);
    assert_eq!(Rewrite::apply(&c.rewrites, "x/a/b").unwrap(), "y/a/b");
    assert_eq!(Rewrite::apply(&c.rewrites, "z/a").unwrap(), "z/a");
    assert_eq!(server.caps, Capabilities::ALL);
    // Routes: the repository rewritten per host, `ns` for mirrors of another host.
    let routes = routes(&hosts, "docker.io", "library/alpine").unwrap();
    let repos: Vec<&str> = routes.iter().map(|r| r.repo.as_str()).collect();
    assert_eq!(
        repos,
        [
            "hub/alpine",
            "library/alpine",
            "library/alpine",
            "library/alpine"
        ]
    );
    assert_eq!(routes[0].namespace.as_deref(), Some("docker.io"));
    assert_eq!(routes[3].namespace, None);
}

#[test]
fn without_server_the_registry_comes_last_and_an_empty_file_is_the_registry() {
    let hosts = parse(
        Path::new("/x/hosts.toml"),
        "[host.\"https://m.example\"]\n",
        "127.0.0.1:5000",
        false,
    )
    .unwrap();
    assert_eq!(hosts.len(), 2);
    assert_eq!(hosts[1].endpoint.api(), "http://127.0.0.1:5000/v2");
    assert_eq!(hosts[0].caps, Capabilities::ALL);
}

#[test]
fn malformed_files_name_file_and_line() {
    for (text, line, says) in [
        ("server = \"https://x\"\n[host.\"https://m\"\n", 2, ""),
        (
            "[host.\"https://m\"]\ncapabilities = [\"pull\", \"fly\"]\n",
            2,
            "unknown capability \"fly\"",
        ),
        ("[host.\"https://m\"]\nskip_verify = \"yes\"\n", 2, ""),
        ("\n[host.\"ftp://m\"]\n", 2, "scheme"),
        ("[host.\"https://m\"]\nca = 3\n", 2, "ca must be"),
        (
            "[host.\"https://m\"]\n\nclient = [[\"a\"]]\n",
            3,
            "client must be",
        ),
        (
            "[host.\"https://m\"]\ndial_timeout = \"soon\"\n",
            2,
            "dial_timeout",
        ),
        (
            "[host.\"https://m\"]\n[host.\"https://m\".rewrite]\n\"(\" = \"x\"\n",
            3,
            "rewrite",
        ),
        (
            "[host.\"https://m\"]\n[host.\"https://m\".header]\n\"bad header\" = \"x\"\n",
            3,
            "header",
        ),
        ("server = 5\n", 1, ""),
    ] {
        let e = parsed(text)
            .err()
            .unwrap_or_else(|| panic!("{text:?} parsed"));
        let msg = e.to_string();
        let at = format!("/etc/containerd/certs.d/docker.io/hosts.toml:{line}: ");
        assert!(msg.starts_with(&at), "{text:?}: {msg}");
        assert!(msg.contains(says), "{text:?}: {msg}");
    }
}

#[test]
fn a_rewrite_must_make_a_repository_name() {
    let hosts = parsed("[host.\"https://m\"]\nrewrite = { \"^(.*)$\" = \"UP/$1\" }\n").unwrap();
    let e = Rewrite::apply(&hosts[0].rewrites, "library/a")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hosts.toml:2") && e.contains("UP/library/a"),
        "{e}"
    );
}

#[test]
fn directories_by_port_then_name_then_default_and_docker_certificates() {
    let root = tmp("dirs");
    let dir = HostsDir(root.clone());
    assert!(dir.hosts("r.example:5000", true, false).unwrap().is_none());
    std::fs::create_dir_all(root.join("_default")).unwrap();
    std::fs::create_dir_all(root.join("r.example:5000")).unwrap();
    assert_eq!(
        dir.dir_for("r.example:5000", true),
        Some(root.join("r.example:5000"))
    );
    std::fs::create_dir_all(root.join("r.example_5000_")).unwrap();
    assert_eq!(
        dir.dir_for("r.example:5000", true),
        Some(root.join("r.example_5000_"))
    );
    assert_eq!(
        dir.dir_for("other.example", true),
        Some(root.join("_default"))
    );
    assert_eq!(dir.dir_for("other.example", false), None);
    // No hosts.toml: Docker's certificate files configure the registry itself.
    let d = root.join("r.example_5000_");
    for f in ["ca.crt", "me.cert", "me.key", "lone.cert", "notes.txt"] {
        std::fs::write(d.join(f), "x").unwrap();
    }
    let hosts = dir.hosts("r.example:5000", true, false).unwrap().unwrap();
    assert_eq!(hosts.len(), 1);
    let tls = &hosts[0].endpoint.tls;
    assert_eq!(tls.ca, [d.join("ca.crt")]);
    assert_eq!(
        tls.client,
        [
            (d.join("lone.cert"), None),
            (d.join("me.cert"), Some(d.join("me.key")))
        ]
    );
    assert_eq!(hosts[0].endpoint.api(), "https://r.example:5000/v2");
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn go_durations() {
    assert_eq!(go_duration("300ms"), Some(Duration::from_millis(300)));
    assert_eq!(go_duration("1m30s"), Some(Duration::from_secs(90)));
    assert_eq!(go_duration("2h"), Some(Duration::from_secs(7200)));
    for bad in ["", "5", "s", "1x", "-1s"] {
        assert_eq!(go_duration(bad), None, "{bad}");
    }
}
