//! The CLI says what happened (issue 11, item 5): each scenario, replayed, ends with the truth
//! on screen and in the exit code.

use crate::support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use support::{weft, weft_bin, weft_command, weft_stdin};

fn list_json(db: &Path) -> Vec<Value> {
    weft(db, &["doc", "list", "--json"])
        .ok()
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// import

#[test]
fn import_with_a_bad_line_says_nothing_was_imported() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    weft(&db, &["doc", "create", "--json", r#"{"before":true}"#]).ok();
    let input = dir.path().join("in.ndjson");
    std::fs::write(&input, "{\"n\":1}\n{\"n\":2}\n\n{\"n\":\n{\"n\":5}\n").unwrap();
    for batch in ["1", "1000"] {
        let e = weft(&db, &["import", input.to_str().unwrap(), "--batch", batch]).runtime_error();
        assert!(
            e.stderr.contains("in.ndjson line 4") && e.stderr.contains("nothing was imported"),
            "{e:#?}"
        );
        assert_eq!(list_json(&db).len(), 1, "and nothing was");
    }
    // The help says how an import fails.
    let help = weft(&db, &["import", "--help"]).ok().stdout;
    assert!(
        help.contains("nothing is imported") && help.contains("resume"),
        "{help}"
    );
}

/// A write that fails part way (here a quota, as a full disk would) leaves the batches already
/// committed; the message gives their number, which is the truth, and a way to resume that
/// imports exactly the rest.
#[test]
fn import_that_fails_part_way_says_how_far_it_got() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("q.db");
    let input = dir.path().join("big.ndjson");
    let mut text = String::new();
    for n in 0..400 {
        text.push_str(&json!({"n": n, "pad": "x".repeat(3000)}).to_string());
        text.push('\n');
        if n == 200 {
            text.push('\n'); // a blank line does not confuse the line numbers
        }
    }
    std::fs::write(&input, &text).unwrap();
    let e = weft(
        &db,
        &[
            "--max-db-size",
            "600KB",
            "import",
            input.to_str().unwrap(),
            "-c",
            "big",
            "--batch",
            "25",
        ],
    )
    .runtime_error();
    let imported = list_json(&db).len();
    assert!(imported > 0 && imported < 400, "{imported}: {e:#?}");
    // The line of document `i` (0-based): one more after the blank line.
    let line_of = |i: usize| if i <= 200 { i + 1 } else { i + 2 };
    assert!(
        e.stderr.contains(&format!(
            "{imported} of 400 documents (through line {})",
            line_of(imported - 1)
        )),
        "the count must be what is in the file ({imported}): {e:#?}"
    );
    let next = line_of(imported);
    assert!(
        e.stderr.contains(&format!(
            "tail -n +{next} {} | weft import - -c big",
            input.display()
        )),
        "{e:#?}"
    );
    // Resuming as told (without the quota) imports exactly the rest.
    let rest: String = text
        .lines()
        .skip(next - 1)
        .map(|l| format!("{l}\n"))
        .collect();
    weft_stdin(&db, &["import", "-", "-c", "big"], rest.as_bytes()).ok();
    let mut ns: Vec<u64> = list_json(&db)
        .iter()
        .map(|d| d["body"]["n"].as_u64().unwrap())
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, (0..400).collect::<Vec<_>>());

    // When the first batch already fails, nothing was imported, and it says so.
    let small = dir.path().join("small.db");
    let e = weft(
        &small,
        &[
            "--max-db-size",
            "100KB",
            "import",
            input.to_str().unwrap(),
            "--batch",
            "400",
        ],
    )
    .runtime_error();
    assert!(e.stderr.contains("nothing was imported"), "{e:#?}");
    assert!(list_json(&small).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Reading stdin

/// `script` (util-linux) runs the command on a pseudo-terminal, the only way to give it a
/// terminal on stdin from a test.
fn have_script() -> bool {
    Command::new("script")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn reading_a_body_from_a_terminal_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    // From a pipe: no note, only the id.
    let out = weft_stdin(&db, &["doc", "create"], br#"{"piped":true}"#).ok();
    assert_eq!(out.stderr, "", "no note when stdin is not a terminal");
    if !have_script() {
        eprintln!("note: `script` is not installed: the terminal case is not tested");
        return;
    }
    // On a terminal: the note, then the body typed (and ended with Ctrl-D) is created.
    let command = format!("{} --db {} doc create", weft_bin(), db.display());
    let mut child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_remove("WEFT_DB")
        .env_remove("WEFT_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"{\"typed\":true}\n\x04").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(
        screen.contains("reading the JSON from stdin") && screen.contains("Ctrl-D"),
        "{screen}"
    );
    let bodies: Vec<Value> = list_json(&db).iter().map(|d| d["body"].clone()).collect();
    assert_eq!(bodies, vec![json!({"piped": true}), json!({"typed": true})]);
}

// ---------------------------------------------------------------------------------------------
// Relay addresses and tokens

#[test]
fn server_addresses_that_are_not_websocket_say_which_to_use() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let cases = [
        ("http://relay.example:7420", "use ws://relay.example:7420"),
        ("HTTP://127.0.0.1:7420", "use ws://127.0.0.1:7420"),
        ("https://relay.example", "use wss://relay.example"),
        ("127.0.0.1:7420", "use ws://127.0.0.1:7420"),
        ("relay.example:7420", "use ws://relay.example:7420"),
        ("ftp://relay.example", "use ws://HOST:PORT"),
    ];
    for (server, hint) in cases {
        let e = weft(&db, &["sync", "--server", server, "--once"]).usage_error();
        assert!(e.stderr.contains(hint), "--server {server}: {e:#?}");
        let mut cmd = weft_command();
        cmd.args(["bench", "fanout", "--server", server]);
        let e = support::run(cmd, None).usage_error();
        assert!(e.stderr.contains(hint), "bench --server {server}: {e:#?}");
    }
    assert!(!db.exists(), "a usage error opens no database");
}

#[test]
fn token_issue_refuses_tokens_that_cannot_do_what_was_asked() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef0123456789").unwrap();
    let issue = |extra: &[&str]| {
        let mut cmd = weft_command();
        cmd.args(["token", "issue", "--secret-file"])
            .arg(&secret)
            .args(["--sub", "ann"])
            .args(extra);
        support::run(cmd, None)
    };
    for extra in [&[][..], &["--read", ""], &["--write", "todos"]] {
        let e = issue(extra).usage_error();
        assert!(
            e.stderr.contains("allows nothing") && e.stderr.contains("--read"),
            "{extra:?}: {e:#?}"
        );
    }
    let e = issue(&["--read", "notes", "--write", "todos,notes"]).usage_error();
    assert!(
        e.stderr.contains("--write todos") && e.stderr.contains("add todos to --read"),
        "{e:#?}"
    );
    let e = issue(&["--read", "notes", "--write", "*"]).usage_error();
    assert!(e.stderr.contains("add * to --read"), "{e:#?}");
    // What makes sense is issued.
    for extra in [
        &["--read", "notes"][..],
        &["--read", "notes,todos", "--write", "todos"],
        &["--read", "*", "--write", "todos"],
        &["--read", "*", "--write", "*"],
    ] {
        let out = issue(extra).ok();
        assert_eq!(out.stdout.matches('.').count(), 2, "a JWT: {out:#?}");
    }
}

/// The client cannot know that a relay ignores its token (the protocol does not say), so the
/// relay, whose operator may believe tokens are checked, says it, once.
#[test]
fn a_relay_without_auth_says_it_ignores_tokens() {
    let run_relay = |token: Option<&str>| -> String {
        let data = tempfile::tempdir().unwrap();
        let mut relay = weft_command()
            .env_remove("WEFT_TOKEN")
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let errors = support::stderr_collector(&mut relay);
        let mut line = String::new();
        BufReader::new(relay.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line.trim().rsplit(' ').next().unwrap().to_owned();
        let db = data.path().join("client.db");
        for _ in 0..2 {
            let mut args = vec!["sync", "--server", &url, "--once"];
            if let Some(t) = token {
                args.extend(["--token", t]);
            }
            weft(&db, &args).ok();
        }
        let _ = relay.kill();
        let _ = relay.wait();
        errors.join().unwrap()
    };
    let quiet = run_relay(None);
    assert!(!quiet.contains("token"), "{quiet}");
    let noted = run_relay(Some("some.jwt.token"));
    assert_eq!(
        noted.matches("tokens are ignored").count(),
        1,
        "once, in the relay's log: {noted}"
    );
}

// ---------------------------------------------------------------------------------------------
// Filters and text

#[test]
fn where_with_an_operator_that_does_not_exist_lists_the_operators() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("w.db");
    weft(&db, &["doc", "create", "--json", r#"{"done":false}"#]).ok();
    for (cond, op) in [
        ("done == false", "=="),
        ("done=>1", "=>"),
        ("n <> 1", "<>"),
        ("n !== 1", "!=="),
    ] {
        let e = weft(&db, &["doc", "list", "--where", cond]).runtime_error();
        assert!(
            e.stderr.contains(&format!("{op} is not an operator"))
                && e.stderr.contains("= != < <= > >="),
            "{cond}: {e:#?}"
        );
    }
    // The real ones still work, values with operator characters included.
    assert_eq!(
        weft(&db, &["doc", "list", "--where", "done = false"])
            .ok()
            .stdout
            .lines()
            .count(),
        1
    );
    weft(&db, &["doc", "list", "--where", r#"s = "a==b""#]).ok();
    weft(&db, &["doc", "list", "--where", "n>=-1"]).ok();
}

#[test]
fn splice_on_a_plain_string_names_set_text() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("x.db");
    let id = weft(&db, &["doc", "create", "--json", r#"{"t":"hello","n":1}"#])
        .ok()
        .stdout
        .trim()
        .to_owned();
    let e = weft(
        &db,
        &["doc", "update", &id, "--splice", "/t", "5", "0", "!"],
    )
    .runtime_error();
    let hint = format!("weft doc update {id} --set-text /t TEXT");
    assert!(
        e.stderr.contains("plain string") && e.stderr.contains(&hint),
        "{e:#?}"
    );
    assert!(!e.stderr.contains("set_text"), "not the Rust call: {e:#?}");
    let e = weft(
        &db,
        &["doc", "update", &id, "--splice", "/n", "0", "0", "x"],
    )
    .runtime_error();
    assert!(e.stderr.contains("--set-text /n"), "{e:#?}");
    // Doing as told works.
    weft(&db, &["doc", "update", &id, "--set-text", "/t", "hello"]).ok();
    weft(
        &db,
        &["doc", "update", &id, "--splice", "/t", "5", "0", "!"],
    )
    .ok();
    let body: Value = serde_json::from_str(&weft(&db, &["doc", "get", &id]).ok().stdout).unwrap();
    assert_eq!(body["t"], "hello!");
}

// ---------------------------------------------------------------------------------------------
// README

#[test]
fn readme_says_how_to_put_weft_on_the_path() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    assert!(readme.contains("cargo install --path ."), "README.md");
}
