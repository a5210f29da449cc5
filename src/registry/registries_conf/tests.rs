use super::*;

fn conf(text: &str) -> RegistriesConf {
    RegistriesConf {
        registries: parse(Path::new("/etc/containers/registries.conf"), text).unwrap(),
    }
}

fn h(api: &str, repo: &str, caps: Capabilities) -> (String, String, Capabilities) {
    (api.into(), repo.into(), caps)
}

fn hosts(c: &RegistriesConf, name: &str) -> Option<Vec<(String, String, Capabilities)>> {
    let r = Reference::parse(name).unwrap();
    c.routes(&r).unwrap().map(|routes| {
        routes
            .into_iter()
            .map(|r| (r.endpoint.api(), r.repo, r.caps))
            .collect()
    })
}

const EXAMPLE: &str = r#"
unqualified-search-registries = ["example.com"]
short-name-mode = "permissive"

[aliases]
"alpine" = "docker.io/library/alpine"

[[registry]]
prefix = "example.com/foo"
insecure = false
blocked = false
location = "internal-registry-for-example.com/bar"

[[registry.mirror]]
location = "example-mirror-0.local/mirror-for-foo"

[[registry.mirror]]
location = "example-mirror-1.local/mirrors/foo"
insecure = true
pull-from-mirror = "digest-only"

[[registry.mirror]]
location = "tags.local"
pull-from-mirror = "tag-only"

[[registry]]
location = "registry.com"
mirror-by-digest-only = true

[[registry.mirror]]
location = "mirror.registry.com"

[[registry]]
prefix = "*.corp.example"
blocked = true

[[registry]]
prefix = "*.lab.example"

[[registry.mirror]]
location = "lab-mirror.example"

[[registry]]
location = "docker.io"

[[registry.mirror]]
location = "hub-mirror.local:5000"
"#;

#[test]
fn every_field_of_a_registries_conf() {
    let c = conf(EXAMPLE);
    let pr = Capabilities::PULL_RESOLVE;
    let all = Capabilities::ALL;
    // Location remaps the prefix; mirrors in order, the registry last; insecure: plain HTTP.
    assert_eq!(
        hosts(&c, "example.com/foo/app:1").unwrap(),
        [
            h(
                "https://example-mirror-0.local/v2",
                "mirror-for-foo/app",
                pr
            ),
            h(
                "http://example-mirror-1.local/v2",
                "mirrors/foo/app",
                Capabilities::PULL
            ),
            h("https://tags.local/v2", "app", pr),
            h(
                "https://internal-registry-for-example.com/v2",
                "bar/app",
                all
            ),
        ]
    );
    // A tag-only mirror is not used for a reference by digest.
    let d = format!("sha256:{}", "a".repeat(64));
    let by_digest = hosts(&c, &format!("example.com/foo/app@{d}")).unwrap();
    assert_eq!(by_digest.len(), 3);
    assert!(by_digest.iter().all(|h| !h.0.contains("tags.local")));
    // mirror-by-digest-only: the mirror may not resolve tags.
    assert_eq!(
        hosts(&c, "registry.com/x/y").unwrap(),
        [
            h("https://mirror.registry.com/v2", "x/y", Capabilities::PULL),
            h("https://registry.com/v2", "x/y", all),
        ]
    );
    // Docker Hub: its API host, library/ kept.
    assert_eq!(
        hosts(&c, "alpine").unwrap(),
        [
            h("https://hub-mirror.local:5000/v2", "library/alpine", pr),
            h("https://registry-1.docker.io/v2", "library/alpine", all),
        ]
    );
    // A wildcard prefix without location keeps the name.
    assert_eq!(
        hosts(&c, "a.b.lab.example/p/q").unwrap(),
        [
            h("https://lab-mirror.example/v2", "p/q", pr),
            h("https://a.b.lab.example/v2", "p/q", all),
        ]
    );
    let r = Reference::parse("x.corp.example/a").unwrap();
    let e = c.routes(&r).unwrap_err().to_string();
    assert!(
        e.contains("registries.conf:") && e.contains("blocked"),
        "{e}"
    );
    assert!(hosts(&c, "quay.io/a/b").is_none());
    // The namespace is the registry mirrored.
    let r = Reference::parse("registry.com/x/y").unwrap();
    assert_eq!(
        c.routes(&r).unwrap().unwrap()[0].namespace.as_deref(),
        Some("registry.com")
    );
}

#[test]
fn the_longest_prefix_wins_and_a_prefix_stops_at_a_separator() {
    let c = conf(
        "[[registry]]\nprefix = \"r.example/a\"\nlocation = \"one.example\"\n\
         [[registry]]\nprefix = \"r.example/a/b\"\nlocation = \"two.example/x\"\n",
    );
    assert_eq!(
        hosts(&c, "r.example/a/b/c").unwrap()[0].0,
        "https://two.example/v2"
    );
    assert_eq!(hosts(&c, "r.example/a/b/c").unwrap()[0].1, "x/c");
    assert_eq!(hosts(&c, "r.example/a/c").unwrap()[0].1, "c");
    assert!(hosts(&c, "r.example/ab").is_none());
}

#[test]
fn drop_ins_replace_tables_with_the_same_prefix() {
    let dir = std::env::temp_dir().join(format!("ocifs-regconf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("registries.conf.d")).unwrap();
    let main = dir.join("registries.conf");
    std::fs::write(
        &main,
        "[[registry]]\nlocation = \"r.example\"\n[[registry.mirror]]\nlocation = \"old.example\"\n",
    )
    .unwrap();
    let d = dir.join("registries.conf.d");
    std::fs::write(
        d.join("20-b.conf"),
        "[[registry]]\nlocation = \"r.example\"\n[[registry.mirror]]\nlocation = \"new.example\"\n",
    )
    .unwrap();
    std::fs::write(
        d.join("10-a.conf"),
        "[[registry]]\nlocation = \"r.example\"\n[[registry.mirror]]\nlocation = \"mid.example\"\n",
    )
    .unwrap();
    std::fs::write(d.join("ignored.txt"), "not toml").unwrap();
    let mut files = vec![main, dir.join("missing.conf")];
    files.extend(drop_ins(&d).unwrap());
    let c = RegistriesConf::load(&files).unwrap();
    assert_eq!(c.registries.len(), 1);
    assert_eq!(
        hosts(&c, "r.example/a").unwrap()[0].0,
        "https://new.example/v2"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn malformed_files_name_file_and_line() {
    for (text, line, says) in [
        (
            "[[registry]]\nlocation = \"a.example\"\n[[registry.mirror]\n",
            3,
            "",
        ),
        ("[[registry]]\ninsecure = true\n", 1, "prefix or a location"),
        (
            "[[registry]]\nlocation = \"a.example\"\n\n[[registry.mirror]]\ninsecure = true\n",
            4,
            "needs a location",
        ),
        (
            "[[registry]]\nlocation = \"a.example\"\n[[registry.mirror]]\nlocation = \"m\"\npull-from-mirror = \"sometimes\"\n",
            5,
            "pull-from-mirror",
        ),
        (
            "[[registry]]\nlocation = \"a.example\"\nmirror-by-digest-only = true\n[[registry.mirror]]\nlocation = \"m.example\"\npull-from-mirror = \"all\"\n",
            6,
            "mirror-by-digest-only",
        ),
        (
            "[[registry]]\nprefix = \"a.*.example\"\n",
            2,
            "only allowed at the start",
        ),
        (
            "[[registry]]\nprefix = \"*.x.example/foo\"\n",
            2,
            "wildcard",
        ),
        (
            "[[registry]]\nprefix = \"*.x.example\"\nlocation = \"y.example\"\n",
            2,
            "takes no location",
        ),
        (
            "[[registry]]\nlocation = \"https://a.example\"\n",
            2,
            "scheme",
        ),
        ("[[registry]]\nlocation = \"A.example/UP\"\n", 2, "location"),
        (
            "[[registry]]\nlocation = \"a.example\"\nblocked = \"no\"\n",
            3,
            "",
        ),
    ] {
        let e = parse(Path::new("/etc/containers/registries.conf"), text)
            .err()
            .unwrap_or_else(|| panic!("{text:?} parsed"))
            .to_string();
        let at = format!("/etc/containers/registries.conf:{line}: ");
        assert!(e.starts_with(&at), "{text:?}: {e}");
        assert!(e.contains(says), "{text:?}: {e}");
    }
}

#[test]
fn the_system_file_of_this_kind_of_machine_parses() {
    // Debian's: comments, then aliases in a drop-in.
    let c = conf(
        "# comment only\nunqualified-search-registries = []\n[aliases]\n\"x\" = \"docker.io/library/x\"\n",
    );
    assert!(c.registries.is_empty());
}
