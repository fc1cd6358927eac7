//! Writing the user's files: whole or not at all, with their mode from creation on.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Writes `contents` to `path` through a temporary name beside it, created with `mode`, so
/// a crash never leaves half a file and a private file is never readable by others. On
/// failure, the path the system complained about and what it said.
pub fn write_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), (PathBuf, std::io::Error)> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| (tmp.clone(), e))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| (tmp.clone(), e))?;
    fs::rename(&tmp, path).map_err(|e| (path.to_path_buf(), e))
}
