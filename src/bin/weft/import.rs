//! `weft import FILE.ndjson`: bulk create, with a progress bar on a terminal.

use std::io::{self, BufRead, IsTerminal};

use serde_json::Value;

use crate::common::{CliError, CliResult, io_err, open};

/// JSON text per transaction, unless one line is more: a transaction's documents are in memory
/// together, parsed (~8 times their text) and as stored bodies and snapshots.
const BATCH_BYTES: usize = 8 << 20;

pub(crate) fn import(
    db: &std::path::Path,
    file: &std::path::Path,
    collection: &str,
    batch: usize,
) -> CliResult {
    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(io::BufReader::new(io::stdin()))
    } else {
        Box::new(io::BufReader::new(
            std::fs::File::open(file).map_err(io_err("opening", file))?,
        ))
    };
    if file.as_os_str() == "-" && io::stdin().is_terminal() {
        eprintln!("reading NDJSON from stdin, one JSON object per line; end with Ctrl-D");
    }
    // Parse and check every line first: a bad line aborts the import before anything is
    // written. Each line keeps its number, to say where a failed write stopped, and stays text
    // until its batch (parsed, it takes ~8 times the memory).
    let mut lines = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        // Invalid UTF-8 surfaces here, so name the line like any other bad line.
        let line = line.map_err(|e| {
            CliError::Io(format!(
                "reading {} line {}: {e}; nothing was imported",
                file.display(),
                n + 1
            ))
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let mut line = line;
        weft::json::parse_object(&line).map_err(|e| {
            CliError::Input(format!(
                "{} line {}: {e}; nothing was imported",
                file.display(),
                n + 1
            ))
        })?;
        line.shrink_to_fit();
        lines.push((n + 1, line));
    }
    weft::validate_collection(collection)?;
    let replica = open(db)?;
    let total = lines.len();
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if io::stderr().is_terminal() {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} documents ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let mut imported = 0;
    let mut through = 0;
    let mut rest = lines.into_iter().peekable();
    while let Some(&(first_line, _)) = rest.peek() {
        // Up to `batch` documents, and no more JSON than BATCH_BYTES unless it is one line.
        let mut lines = Vec::new();
        let mut chunk = Vec::new();
        let mut bytes = 0;
        while let Some((n, text)) = rest.next_if(|(_, text)| {
            lines.is_empty() || (lines.len() < batch && bytes + text.len() <= BATCH_BYTES)
        }) {
            bytes += text.len();
            // Checked above already: this cannot fail.
            let body = weft::json::parse_object(&text).map_err(weft::Error::from)?;
            drop(text);
            lines.push(n);
            chunk.push(Value::Object(body));
        }
        if let Err(e) = replica.create_many(collection, chunk) {
            bar.finish_and_clear();
            // Earlier batches are committed and stay; this one and the rest are not written.
            if imported == 0 {
                return Err(CliError::Io(format!("{e}; nothing was imported")));
            }
            let input = if file.as_os_str() == "-" {
                "INPUT".to_owned()
            } else {
                file.display().to_string()
            };
            return Err(CliError::Io(format!(
                "importing lines {first_line}-{} failed: {e}. {imported} of {total} documents \
                 (through line {through}) were imported and stay; the rest were not. To resume: \
                 tail -n +{first_line} {input} | weft import - -c {collection}",
                lines.last().copied().unwrap_or(first_line)
            )));
        }
        imported += lines.len();
        through = lines.last().copied().unwrap_or(through);
        bar.inc(lines.len() as u64);
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "imported {total} documents into {collection} in {secs:.2} s ({:.0}/s)",
        total as f64 / secs.max(1e-9)
    );
    Ok(())
}
