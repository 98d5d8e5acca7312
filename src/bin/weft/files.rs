//! Commands on the whole file: bundles for manual sync, and compaction.

use std::path::Path;

use weft::BundleScope;

use crate::common::{CliResult, Reader, file_size, io_err, open, write_atomically};

/// `weft export-bundle FILE [--collection C | --since SEQ]`.
pub(crate) fn export_bundle(
    db: &Path,
    file: &Path,
    collection: Option<String>,
    since: Option<u64>,
) -> CliResult {
    let scope = match (collection, since) {
        (Some(c), _) => BundleScope::Collection(c),
        (None, Some(seq)) => BundleScope::Since(seq),
        (None, None) => BundleScope::All,
    };
    let bytes = Reader::new(db).read(|r| r.export_bundle(&scope))?;
    let entries = weft::Bundle::decode(&bytes)
        .map(|b| b.entries.len())
        .unwrap_or(0);
    write_atomically(file, &bytes)?;
    eprintln!(
        "exported {entries} documents ({} bytes) to {}",
        bytes.len(),
        file.display()
    );
    Ok(())
}

/// `weft import-bundle FILE`.
pub(crate) fn import_bundle(db: &Path, file: &Path) -> CliResult {
    let bytes = std::fs::read(file).map_err(io_err("reading", file))?;
    let replica = open(db)?;
    let r = replica.import_bundle(&bytes)?;
    eprintln!(
        "imported {}: {} created, {} updated, {} deleted, {} unchanged",
        file.display(),
        r.created,
        r.updated,
        r.deleted,
        r.unchanged
    );
    Ok(())
}

/// `weft compact`.
pub(crate) fn compact(db: &Path) -> CliResult {
    let replica = open(db)?;
    let before = file_size(db);
    let report = replica.compact()?;
    eprintln!(
        "compacted {} documents, removed {} superseded change-feed entries; {} -> {} bytes",
        report.documents,
        report.feed_entries_removed,
        before,
        file_size(db)
    );
    Ok(())
}
