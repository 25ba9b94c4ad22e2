//! Key files (`[pop] ticket_keys`, `[dns] cookie_keys`): one key per line in hex, `#` starts a
//! comment, blank lines are skipped. Each user checks the keys' length and meaning.

use std::path::Path;

/// One key line: its number in the file (from 1) and its bytes, `None` when not hex.
pub struct KeyLine {
    pub line: usize,
    pub bytes: Option<Vec<u8>>,
}

/// The file's key lines, in order.
pub fn read_hex_lines(path: &Path) -> std::io::Result<Vec<KeyLine>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .enumerate()
        .filter_map(|(i, raw)| {
            let line = raw.split('#').next().unwrap_or("").trim();
            (!line.is_empty()).then(|| KeyLine {
                line: i + 1,
                bytes: hex::decode(line).ok(),
            })
        })
        .collect())
}
