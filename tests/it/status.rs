//! What tripline shows: `/api/v1/*`, Alertmanager's API v2 driven by the
//! real `amtool`, `tripline alerts` / `tripline status`, and the status page
//! rendered by a real headless Chromium.

use std::process::Command;
use std::time::Duration;

use crate::util::*;

const RULE: &str = r#"
fn on_message(msg, ctx) {
    if msg.v == 7 { throw "reading 7 is cursed"; }
    let a = #{ name: "Hot", severity: "major", labels: #{ host: msg.host },
               summary: "{{host}} runs hot" };
    if msg.v >= 100 { alert(a); } else { resolve(a); }
}"#;

const TOKEN: &str = "st4tus-admin";

fn project(port: u16, instance: &str) -> Project {
    Project::new(
        &format!(
            "instance: {instance}\nhttp:\n  listen: 127.0.0.1:{port}\n  admin_token_env: TRIPLINE_TEST_ADMIN\nsubscriptions:\n  - name: hot\n    streams: [s]\n"
        ),
        &[("rules/hot.rhai", RULE), ("plugins/file.yaml", FILE_SINK)],
    )
}

fn start(p: &Project, redis: &RedisServer, addr: &str) -> Tripline {
    let tl = p.start_with_env(redis, &["run"], &[("TRIPLINE_TEST_ADMIN", TOKEN)]);
    tl.wait_ready(addr);
    tl
}

fn get_json(addr: &str, path: &str) -> serde_json::Value {
    let r = http_call(addr, "GET", path, &[], b"").unwrap();
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.json()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn tripline_alerts(p: &Project, url: &str, extra: &[&str]) -> String {
    run(Command::new(bin())
        .current_dir(p.dir.path())
        .args(["alerts", "--url", url])
        .args(extra))
}

fn amtool(url: &str, http_config: &std::path::Path, args: &[&str]) -> String {
    run(Command::new("amtool")
        .arg(format!("--alertmanager.url={url}"))
        .arg(format!("--http.config.file={}", http_config.display()))
        .args(args))
}

#[test]
fn status_two_instances_list_each_alert_once_and_amtool_silences_one() {
    let redis = RedisServer::start();
    let (port_a, port_b) = (free_port(), free_port());
    let (addr_a, addr_b) = (format!("127.0.0.1:{port_a}"), format!("127.0.0.1:{port_b}"));
    let (url_a, url_b) = (format!("http://{addr_a}"), format!("http://{addr_b}"));
    let pa = project(port_a, "status-a");
    let pb = project(port_b, "status-b");
    let _a = start(&pa, &redis, &addr_a);
    let _b = start(&pb, &redis, &addr_b);

    let mut con = redis.conn();
    for host in ["core-1", "edge-1"] {
        xadd(&mut con, "s", &[("host", host.as_bytes()), ("v", b"500")]);
    }
    xadd(&mut con, "s", &[("host", b"core-1"), ("v", b"7")]);
    let firing = |addr: &str| {
        get_json(addr, "/api/v1/alerts")["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["state"] == "firing")
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(20), || firing(&addr_a) == 2),
        "{}",
        get_json(&addr_a, "/api/v1/alerts")
    );
    // Both instances answer for the whole group, each alert once.
    for addr in [&addr_a, &addr_b] {
        let all = get_json(addr, "/api/v1/alerts");
        let mut fps: Vec<&str> = all["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["fingerprint"].as_str().unwrap())
            .collect();
        fps.sort();
        fps.dedup();
        assert_eq!(fps.len(), 2, "{all}");
        let a = &all["alerts"][0];
        assert_eq!(a["rule"], "hot");
        assert_eq!(a["severity"], "major");
        assert!(a["active_since"].as_str().unwrap().ends_with('Z'), "{a}");
        assert!(a["last_notification"].is_string(), "{a}");
    }
    let one = get_json(&addr_b, "/api/v1/alerts?filter=host%3D~core-.*");
    assert_eq!(one["alerts"].as_array().unwrap().len(), 1, "{one}");
    let bad = http_call(&addr_a, "GET", "/api/v1/alerts?filter=nolabel", &[], b"").unwrap();
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("nolabel"), "{}", bad.text());

    let listing = tripline_alerts(&pa, &url_a, &[]);
    println!("$ tripline alerts --url {url_a}\n{listing}");
    assert_eq!(listing.lines().count(), 3, "{listing}");
    assert!(listing.contains("host=core-1") && listing.contains("host=edge-1"));

    let http_config = pa.path("amtool-http.yaml");
    std::fs::write(
        &http_config,
        format!("authorization:\n  type: Bearer\n  credentials: {TOKEN}\n"),
    )
    .unwrap();
    let query = amtool(&url_a, &http_config, &["-o", "extended", "alert", "query"]);
    println!("$ amtool --alertmanager.url={url_a} -o extended alert query\n{query}");
    assert!(
        query.contains("core-1") && query.contains("edge-1"),
        "{query}"
    );
    let simple = amtool(&url_a, &http_config, &["alert", "query"]);
    println!("$ amtool --alertmanager.url={url_a} alert query\n{simple}");
    assert_eq!(simple.matches("Hot").count(), 2, "{simple}");

    let unauthorized = Command::new("amtool")
        .arg(format!("--alertmanager.url={url_a}"))
        .args(["silence", "add", "host=core-1", "--comment=no token"])
        .output()
        .unwrap();
    assert!(
        !unauthorized.status.success(),
        "a silence without the token"
    );
    let id = amtool(
        &url_a,
        &http_config,
        &[
            "silence",
            "add",
            "host=core-1",
            "--duration=1h",
            "--comment=line card swap",
            "--author=oncall",
        ],
    );
    // amtool adds a warning line: its version is not ours.
    let id = id.lines().next().unwrap().trim().to_string();
    println!(
        "$ amtool --alertmanager.url={url_a} silence add host=core-1 --duration=1h --comment='line card swap'\n{id}"
    );
    let silences = amtool(&url_a, &http_config, &["silence", "query"]);
    println!("$ amtool silence query\n{silences}");
    assert!(
        silences.contains(&id) && silences.contains("line card swap"),
        "{silences}"
    );

    // Listed through the other instance: the silence mutes core-1 only.
    let muted = tripline_alerts(&pb, &url_b, &[]);
    println!("$ tripline alerts --url {url_b}\n{muted}");
    let core = muted.lines().find(|l| l.contains("host=core-1")).unwrap();
    let edge = muted.lines().find(|l| l.contains("host=edge-1")).unwrap();
    assert!(core.contains(&id) && !edge.contains(&id), "{muted}");
    let active = amtool(&url_a, &http_config, &["alert", "query", "--active"]);
    assert!(
        !active.contains("core-1"),
        "silenced alerts are not active: {active}"
    );
    let json = tripline_alerts(&pb, &url_b, &["-o", "json", "host=core-1"]);
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed["alerts"][0]["silenced_by"][0], id.as_str(), "{json}");
    // Our own API lists it with RFC 3339 times.
    let ours = get_json(&addr_a, "/api/silences");
    assert!(
        ours[0]["ends_at"].as_str().unwrap().ends_with('Z'),
        "{ours}"
    );
    assert!(ours[0].get("ends_ms").is_none(), "{ours}");

    amtool(&url_a, &http_config, &["silence", "expire", &id]);
    let after = tripline_alerts(&pa, &url_a, &[]);
    assert!(!after.contains(&id), "{after}");

    let rules = get_json(&addr_a, "/api/v1/rules");
    let hot = &rules["rules"][0];
    assert_eq!(hot["name"], "hot", "{rules}");
    assert_eq!(hot["file"], "hot.rhai");
    assert_eq!(hot["subscriptions"][0]["streams"][0], "s");
    let last = &hot["last_error"];
    // The failing message may have gone to either instance.
    let other = get_json(&addr_b, "/api/v1/rules");
    let last = if last.is_null() {
        &other["rules"][0]["last_error"]
    } else {
        last
    };
    assert!(
        last["error"].as_str().unwrap().contains("hot.rhai:3:")
            && last["error"].as_str().unwrap().contains("cursed"),
        "{rules}\n{other}"
    );

    let status = get_json(&addr_a, "/api/v1/status");
    assert_eq!(status["instance"], "status-a", "{status}");
    assert_eq!(status["redis"]["reachable"], true);
    assert_eq!(status["reloads"]["rules"]["result"], "success");
    assert_eq!(status["subscriptions"][0]["group"], "hot");
    assert!(
        status["subscriptions"][0]["streams"][0]["consumers"]
            .as_u64()
            .unwrap()
            >= 2,
        "{status}"
    );
    assert_eq!(status["sinks"]["file"]["kind"], "file", "{status}");
    let s = tripline_status(&pa, &url_a);
    assert!(
        s.contains("instance status-a") && s.contains("sink file (file)"),
        "{s}"
    );

    assert!(
        wait_until(Duration::from_secs(10), || http_request(
            &addr_b, "GET", "/metrics", ""
        )
        .1
        .contains(
            "tripline_alerts_active{state=\"firing\",severity=\"major\",rule=\"hot\"} 2"
        )),
        "{}",
        http_request(&addr_b, "GET", "/metrics", "").1
    );
    let am_status = get_json(&addr_a, "/api/v2/status");
    assert_eq!(am_status["cluster"]["status"], "ready");
}

fn tripline_status(p: &Project, url: &str) -> String {
    run(Command::new(bin())
        .current_dir(p.dir.path())
        .args(["status", "--url", url]))
}

/// A label value built to break out of HTML, attributes and lines.
const HOSTILE: &str = "<script>alert(1)</script>\"'\n\u{1b}[31mred";

/// Debian's Chromium without a display, bounded to a minute: a sandbox
/// needs privileges CI containers lack, and /dev/shm is small there.
fn headless_chromium() -> Command {
    let mut c = Command::new("timeout");
    c.args([
        "60",
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
    ])
    .arg("--disable-dev-shm-usage");
    c
}

#[test]
fn status_page_in_headless_chromium_shows_labels_rule_error_and_silences() {
    let redis = RedisServer::start();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let p = project(port, "status-page");
    let tl = start(&p, &redis, &addr);
    let mut con = redis.conn();
    xadd(
        &mut con,
        "s",
        &[("host", HOSTILE.as_bytes()), ("v", b"500")],
    );
    xadd(&mut con, "s", &[("host", b"core-1"), ("v", b"500")]);
    xadd(&mut con, "s", &[("host", b"core-1"), ("v", b"7")]);
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let added = http_call(
        &addr,
        "POST",
        "/api/silences",
        &auth,
        br#"{"matchers": ["host=core-1"], "duration": "2h", "comment": "optics swap <b>today</b>", "created_by": "oncall"}"#,
    )
    .unwrap();
    assert_eq!(added.status, 200, "{}", added.text());
    assert!(added.json()["starts_at"].as_str().unwrap().ends_with('Z'));
    p.write(
        "rules/broken.rhai",
        "fn on_message(msg, ctx) {\n    let x = ;\n}\n",
    );
    let reload = http_call(&addr, "POST", "/-/reload", &auth, b"").unwrap();
    assert_eq!(reload.status, 500, "{}", reload.text());
    assert!(
        wait_until(Duration::from_secs(20), || {
            let a = get_json(&addr, "/api/v1/alerts");
            a["alerts"].as_array().unwrap().len() == 2
                && get_json(&addr, "/api/v1/rules")["rules"][0]["last_error"].is_object()
        }),
        "{}",
        tl.stderr()
    );

    let url = format!("http://{addr}/");
    let dom = run(headless_chromium().args(["--dump-dom", &url]));
    // The alert's labels, escaped: text, never markup.
    assert!(dom.contains("host=core-1"), "{dom}");
    assert!(
        dom.contains("host=&lt;script&gt;alert(1)&lt;/script&gt;\"'\\n\\x1b[31mred"),
        "{dom}"
    );
    assert!(!dom.contains("<script>alert(1)"), "{dom}");
    assert!(!dom.contains("<b>today</b>"), "{dom}");
    // The rule's last error and the failed reload, each at file:line.
    assert!(dom.contains("hot.rhai:3:"), "{dom}");
    assert!(dom.contains("cursed"), "{dom}");
    assert!(dom.contains("broken.rhai:2"), "{dom}");
    // The silence count, and the silenced alert marked.
    assert!(dom.contains("<span id=\"silence-count\">1</span>"), "{dom}");
    assert!(dom.contains("alert silenced"), "{dom}");
    assert!(dom.contains("<span id=\"firing-count\">2</span>"), "{dom}");
    if let Ok(path) = std::env::var("STATUS_PAGE_SCREENSHOT") {
        run(headless_chromium()
            .arg("--hide-scrollbars")
            .arg(format!("--screenshot={path}"))
            .args(["--window-size=1280,900", &url]));
    }
}

#[test]
fn status_on_redis_cluster_lists_alerts_of_every_shard_and_the_nodes() {
    let cluster = RedisCluster::start(3, 0, 2000);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let p = Project::new(
        &format!(
            "instance: status-cluster\nhttp:\n  listen: 127.0.0.1:{port}\nsubscriptions:\n  - name: hot\n    streams: [{{topic: t, shards: 2}}]\n"
        ),
        &[("rules/hot.rhai", RULE)],
    );
    let tl = p.start_on(&cluster.addr());
    tl.wait_ready(&addr);
    let mut con = cluster.conn();
    for (shard, host) in [("t:{0}", "core-1"), ("t:{1}", "edge-1")] {
        let _: String = redis::cmd("XADD")
            .arg(shard)
            .arg("*")
            .arg("host")
            .arg(host)
            .arg("v")
            .arg("500")
            .query(&mut con)
            .unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(20), || get_json(
            &addr,
            "/api/v1/alerts"
        )["alerts"]
            .as_array()
            .unwrap()
            .len()
            == 2),
        "{}\n{}",
        get_json(&addr, "/api/v1/alerts"),
        tl.stderr()
    );
    let status = get_json(&addr, "/api/v1/status");
    assert_eq!(status["redis"]["cluster"], true, "{status}");
    assert_eq!(status["redis"]["reachable"], true, "{status}");
    let nodes = status["redis"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{status}");
    assert!(
        nodes.iter().all(|n| n.as_str().unwrap().contains("master")),
        "{status}"
    );
    let streams = &status["subscriptions"][0]["streams"];
    assert_eq!(streams.as_array().unwrap().len(), 2, "{status}");
}

#[test]
fn status_masks_the_redis_password_everywhere_it_shows_the_endpoint() {
    let redis = RedisServer::start_with_password("hunter2-s3cret");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let p = project(port, "status-masked");
    let url = redis.url();
    let tl = p.start_with_env(
        &redis,
        &["run"],
        &[("REDIS_ADDR", url.as_str()), ("TRIPLINE_TEST_ADMIN", TOKEN)],
    );
    tl.wait_ready(&addr);
    let status = get_json(&addr, "/api/v1/status");
    assert_eq!(status["redis"]["reachable"], true, "{status}");
    assert!(
        status["redis"]["endpoint"]
            .as_str()
            .unwrap()
            .contains("***"),
        "{status}"
    );
    for path in ["/api/v1/status", "/", "/api/v2/status"] {
        let body = http_call(&addr, "GET", path, &[], b"").unwrap().text();
        assert!(
            !body.contains("hunter2"),
            "{path} shows the password: {body}"
        );
    }
}
