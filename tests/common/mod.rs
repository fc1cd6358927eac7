//! What the tests that run the binary share.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::mpsc;

/// The child's standard error, line by line, read on a thread of its own so that a silent
/// child cannot hang a test (receive with a timeout).
pub fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
