//! `weft doc ...`: create, read, change, delete and list documents.

use std::io::{self, Write};

use clap::{Args, Subcommand};
use serde_json::json;
use weft::{Filter, Path as DocPath, Query};

use crate::common::{
    CliError, CliResult, Reader, heads_json, open, out, output_err, parse_id, parse_value,
    read_json_arg,
};

#[derive(Subcommand)]
pub(crate) enum DocCmd {
    /// Create a document; prints its id.
    Create {
        #[arg(long, short, default_value = "default")]
        collection: String,
        /// The body as JSON (an object). Read from stdin when absent or `-`.
        #[arg(long)]
        json: Option<String>,
    },
    /// Print a document's JSON body.
    Get {
        id: String,
        /// Wrap the body with id, collection and heads.
        #[arg(long)]
        meta: bool,
        /// Read as of these heads (comma-separated hex hashes, as `--meta` prints them).
        #[arg(long, value_delimiter = ',')]
        at: Option<Vec<String>>,
    },
    /// Change a document.
    Update(UpdateArgs),
    /// Delete a document (replicated tombstone).
    Delete { id: String },
    /// List live documents.
    List {
        #[arg(long, short)]
        collection: Option<String>,
        /// Condition on the body, e.g. `done = false`, `size >= 3`, `owner.name = "ann"`,
        /// `tags[0] exists`. Repeat to AND several.
        #[arg(long = "where", value_name = "COND")]
        conditions: Vec<String>,
        #[arg(long)]
        limit: Option<usize>,
        /// NDJSON lines {"id","collection","body"} instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub(crate) struct UpdateArgs {
    id: String,
    #[command(flatten)]
    how: UpdateHow,
}

/// Exactly one way to change the document.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub(crate) struct UpdateHow {
    /// Apply an RFC 7386 merge patch.
    #[arg(long, value_name = "JSON")]
    merge: Option<String>,
    /// Set the value at a JSON Pointer: --set /path JSON.
    #[arg(long, num_args = 2, value_names = ["POINTER", "JSON"])]
    set: Option<Vec<String>>,
    /// Remove the value at a JSON Pointer.
    #[arg(long, value_name = "POINTER")]
    unset: Option<String>,
    /// Make the value at a pointer collaborative text: --set-text /path TEXT.
    #[arg(long, num_args = 2, value_names = ["POINTER", "TEXT"])]
    set_text: Option<Vec<String>>,
    /// Splice collaborative text: --splice /path INDEX DELETE TEXT.
    #[arg(long, num_args = 4, value_names = ["POINTER", "INDEX", "DELETE", "TEXT"])]
    splice: Option<Vec<String>>,
}

pub(crate) fn doc(db: &std::path::Path, cmd: DocCmd) -> CliResult {
    match cmd {
        DocCmd::Create { collection, json } => {
            let body = read_json_arg(json)?;
            let replica = open(db)?;
            let id = replica.create(&collection, body)?;
            out(&id.to_string())
        }
        DocCmd::Get { id, meta, at } => {
            let id = parse_id(&id)?;
            let heads = match at {
                Some(hashes) => Some(
                    hashes
                        .iter()
                        .map(|h| {
                            h.trim().parse::<weft::ChangeHash>().map_err(|_| {
                                CliError::Input(format!(
                                    "{h:?} is not a change hash (64 hex characters)"
                                ))
                            })
                        })
                        .collect::<CliResult<Vec<_>>>()?,
                ),
                None => None,
            };
            let doc = Reader::new(db).read(|r| match &heads {
                Some(heads) => r.get_at(&id, heads),
                None => r.get(&id),
            })?;
            if meta {
                out(&json!({"id": doc.id.to_string(), "collection": doc.collection, "heads": heads_json(&doc.heads), "body": doc.body}).to_string())
            } else {
                out(&doc.body.to_string())
            }
        }
        DocCmd::Update(args) => {
            let id = parse_id(&args.id)?;
            let args_id = args.id.trim().to_owned();
            let pointer = |p: &str| DocPath::from_pointer(p).map_err(weft::Error::from);
            let replica = open(db)?;
            let args = args.how;
            if let Some(patch) = args.merge {
                replica.update(&id, read_json_arg(Some(patch))?)?;
            } else if let Some(v) = args.set {
                replica.set(&id, &pointer(&v[0])?, parse_value(&v[1])?)?;
            } else if let Some(p) = args.unset {
                replica.delete_path(&id, &pointer(&p)?)?;
            } else if let Some(v) = args.set_text {
                replica.set_text(&id, &pointer(&v[0])?, &v[1])?;
            } else if let Some(v) = args.splice {
                let number = |s: &str| {
                    s.parse::<usize>().map_err(|_| {
                        CliError::Input(format!("{s:?} is not a non-negative integer"))
                    })
                };
                replica
                    .splice(&id, &pointer(&v[0])?, number(&v[1])?, number(&v[2])?, &v[3])
                    .map_err(|e| match e {
                        // The library names its own call (`set_text`); say the CLI's option.
                        weft::Error::Json(weft::JsonError::NotText { found, .. }) => {
                            CliError::Input(format!(
                                "the value at {} is {found}, not collaborative text: make it \
                                 text first with `weft doc update {} --set-text {} TEXT`",
                                v[0], args_id, v[0]
                            ))
                        }
                        e => e.into(),
                    })?;
            }
            Ok(())
        }
        DocCmd::Delete { id } => {
            let id = parse_id(&id)?;
            let replica = open(db)?;
            // A missing document is an error; an already deleted one is not.
            replica.delete(&id)?;
            Ok(())
        }
        DocCmd::List {
            collection,
            conditions,
            limit,
            json,
        } => {
            let mut query = Query {
                collection,
                filter: None,
                limit,
            };
            for c in &conditions {
                query = query.filter(Filter::parse(c)?);
            }
            let docs = Reader::new(db).read(|r| r.query(&query))?;
            let mut stdout = io::BufWriter::new(io::stdout().lock());
            let write = |w: &mut dyn Write, line: String| writeln!(w, "{line}").map_err(output_err);
            for d in docs {
                if json {
                    write(
                        &mut stdout,
                        json!({"id": d.id.to_string(), "collection": d.collection, "body": d.body})
                            .to_string(),
                    )?;
                } else {
                    let mut body = d.body.to_string();
                    if body.chars().count() > 100 {
                        body = body.chars().take(99).collect::<String>() + "…";
                    }
                    write(
                        &mut stdout,
                        format!("{}  {:<12}  {}", d.id, d.collection, body),
                    )?;
                }
            }
            stdout.flush().map_err(output_err)
        }
    }
}
