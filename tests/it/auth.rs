//! Relay security through real processes: `weft serve --auth-secret-file`, tokens from
//! `weft token issue`, and `weft sync --once` as the client. Every operation is tried with
//! every kind of token on a readable and an unreadable collection; forbidden ones must fail
//! with a clear error and leave the relay's copy of the document exactly as it was.
#![cfg(feature = "net")]

use std::path::Path;

use serde_json::json;
use weft::net::auth::TokenKey;
use weft::{DocumentId, Replica, Scope};

use crate::support::relay::RelayProcess;
use crate::support::{self, weft};

const A: &str = "alpha";
const B: &str = "beta";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Token {
    None,
    Expired,
    WrongSignature,
    ReadA,
    ReadWriteA,
    ReadWriteAll,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Op {
    List,
    Read,
    Create,
    Update,
    Delete,
}

impl Token {
    fn may_read(self, collection: &str) -> bool {
        match self {
            Token::None | Token::Expired | Token::WrongSignature => false,
            Token::ReadA | Token::ReadWriteA => collection == A,
            Token::ReadWriteAll => true,
        }
    }

    fn may_write(self, collection: &str) -> bool {
        match self {
            Token::ReadWriteA => collection == A,
            Token::ReadWriteAll => true,
            _ => false,
        }
    }

    /// What the error must say when this token is refused outright.
    fn refusal(self) -> Option<&'static str> {
        match self {
            Token::None => Some("no token"),
            Token::Expired => Some("expired"),
            Token::WrongSignature => Some("signature does not match"),
            _ => None,
        }
    }
}

fn issue(secret: &Path, sub: &str, read: &str, write: &str) -> String {
    let out = weft(
        Path::new("unused.db"),
        &[
            "token",
            "issue",
            "--secret-file",
            secret.to_str().expect("utf-8 path"),
            "--sub",
            sub,
            "--read",
            read,
            "--write",
            write,
            "--ttl",
            "1h",
        ],
    )
    .ok();
    out.stdout.trim().to_owned()
}

fn sync_once(db: &Path, url: &str, collection: &str, token: Option<&str>) -> support::Output {
    let mut args = vec![
        "sync",
        "--server",
        url,
        "--once",
        "--timeout",
        "60",
        "--collection",
        collection,
    ];
    if let Some(t) = token {
        args.extend(["--token", t]);
    }
    weft(db, &args)
}

#[test]
fn every_operation_with_every_token_is_allowed_or_refused_as_the_token_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("relay.secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef-relay\n").expect("secret");
    let other_secret = dir.path().join("other.secret");
    std::fs::write(
        &other_secret,
        "another secret, also long enough to be accepted",
    )
    .unwrap();
    let relay = RelayProcess::start_with(
        &dir.path().join("relay"),
        &["--auth-secret-file", secret.to_str().unwrap()],
    );

    let tokens = [
        (Token::None, None),
        (Token::Expired, {
            let key = TokenKey::from_file(&secret).expect("key");
            let an_hour_ago = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                - 3600;
            Some(
                key.issue_until("late", &Scope::All, &Scope::All, an_hour_ago)
                    .unwrap(),
            )
        }),
        (
            Token::WrongSignature,
            Some(issue(&other_secret, "forger", "*", "*")),
        ),
        (Token::ReadA, Some(issue(&secret, "reader", A, ""))),
        (Token::ReadWriteA, Some(issue(&secret, "writer", A, A))),
        (Token::ReadWriteAll, Some(issue(&secret, "admin", "*", "*"))),
    ];
    let admin = tokens[5].1.clone().unwrap();

    // The relay's contents: one document per collection to read, and one per (token,
    // operation, collection) to change, so that cases do not disturb each other.
    let seed_db = dir.path().join("seed.db");
    let seed = Replica::open(&seed_db).unwrap();
    let readable = [A, B].map(|c| seed.create(c, json!({"seed": c})).unwrap());
    let mut targets = std::collections::HashMap::new();
    for (token, _) in &tokens {
        for op in [Op::Update, Op::Delete] {
            for c in [A, B] {
                let id = seed
                    .create(
                        c,
                        json!({"token": format!("{token:?}"), "op": format!("{op:?}")}),
                    )
                    .unwrap();
                targets.insert((*token, op, c), id);
            }
        }
    }
    let bundle = dir.path().join("all.bundle");
    std::fs::write(
        &bundle,
        seed.export_bundle(&weft::BundleScope::All).unwrap(),
    )
    .unwrap();
    drop(seed);
    for c in [A, B] {
        sync_once(&seed_db, &relay.url, c, Some(&admin)).ok();
    }

    let mut checked = 0;
    for (n, (token, value)) in tokens.iter().enumerate() {
        for op in [Op::List, Op::Read, Op::Create, Op::Update, Op::Delete] {
            for c in [A, B] {
                let case = format!("{token:?} {op:?} {c}");
                let db = dir.path().join(format!("case-{n}-{op:?}-{c}.db"));
                let replica = Replica::open(&db).unwrap();
                // The document the operation is about, as the relay holds it beforehand.
                let target = match op {
                    Op::List | Op::Read => Some(readable[usize::from(c == B)]),
                    Op::Create => None,
                    Op::Update | Op::Delete => {
                        // The replica got the document some other way (a bundle) and
                        // changes it offline.
                        replica
                            .import_bundle(&std::fs::read(&bundle).unwrap())
                            .unwrap();
                        Some(targets[&(*token, op, c)])
                    }
                };
                let target = match op {
                    Op::Create => replica.create(c, json!({"new": case})).unwrap(),
                    Op::Update => {
                        let id = target.unwrap();
                        replica.update(&id, json!({"changed": case})).unwrap();
                        id
                    }
                    Op::Delete => {
                        let id = target.unwrap();
                        replica.delete(&id).unwrap();
                        id
                    }
                    Op::List | Op::Read => target.unwrap(),
                };
                drop(replica);
                let before = relay.state(&target);

                let out = sync_once(&db, &relay.url, c, value.as_deref());

                let allowed = match op {
                    Op::List | Op::Read => token.may_read(c),
                    _ => token.may_write(c),
                };
                let replica = Replica::open(&db).unwrap();
                if allowed {
                    assert_eq!(out.code, Some(0), "{case}: {out:#?}");
                    match op {
                        Op::List => {
                            let ids: Vec<DocumentId> = replica
                                .query(&weft::Query::collection(c))
                                .unwrap()
                                .into_iter()
                                .map(|d| d.id)
                                .collect();
                            assert!(ids.contains(&target), "{case}: {ids:?}");
                        }
                        Op::Read => {
                            assert_eq!(replica.get(&target).unwrap().body, json!({"seed": c}))
                        }
                        Op::Create | Op::Update => assert_eq!(
                            relay.state(&target),
                            format!("heads {:?}", replica.get(&target).unwrap().heads),
                            "{case}"
                        ),
                        Op::Delete => {
                            let after = relay.state(&target);
                            assert!(after.contains("deleted"), "{case}: {after}");
                        }
                    }
                } else {
                    let out = out.runtime_error();
                    let expected = token.refusal().unwrap_or(if token.may_read(c) {
                        "may not write collection"
                    } else {
                        "does not allow reading"
                    });
                    assert!(out.stderr.contains(expected), "{case}: {out:#?}");
                    assert_eq!(relay.state(&target), before, "{case}: the relay changed");
                    if matches!(op, Op::List | Op::Read) {
                        assert!(replica.get(&target).is_err(), "{case}: read anyway");
                    }
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 60);

    // Asking for everything with a token for alpha syncs alpha, and says that it did only that.
    let db = dir.path().join("narrowed.db");
    let out = weft(
        &db,
        &[
            "sync",
            "--server",
            &relay.url,
            "--once",
            "--token",
            tokens[4].1.as_deref().unwrap(),
        ],
    )
    .ok();
    assert!(
        out.stderr.contains("grants only collections alpha"),
        "{out:#?}"
    );
    let replica = Replica::open(&db).unwrap();
    assert!(replica.get(&readable[0]).is_ok());
    assert!(replica.get(&readable[1]).is_err());
}

#[test]
fn serve_refuses_a_public_address_without_auth_unless_told_and_checks_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let data = data.to_str().unwrap();
    let out = weft(
        Path::new("unused.db"),
        &["serve", "--listen", "0.0.0.0:0", "--data", data],
    );
    let out = out.runtime_error();
    assert!(out.stderr.contains("without authentication"), "{out:#?}");
    assert!(out.stderr.contains("--auth-secret-file"), "{out:#?}");

    let weak = dir.path().join("weak.secret");
    std::fs::write(&weak, "hunter2\n").unwrap();
    let out = weft(
        Path::new("unused.db"),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data,
            "--auth-secret-file",
            weak.to_str().unwrap(),
        ],
    )
    .runtime_error();
    assert!(out.stderr.contains("too short"), "{out:#?}");
    let out = weft(
        Path::new("unused.db"),
        &[
            "token",
            "issue",
            "--secret-file",
            weak.to_str().unwrap(),
            "--sub",
            "x",
        ],
    )
    .runtime_error();
    assert!(out.stderr.contains("too short"), "{out:#?}");
}
