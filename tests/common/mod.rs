//! What the tests that run the binary share.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command};
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

/// The component process a test runs: killed and reaped when dropped, so a failing test
/// leaves nothing running.
pub struct Running(pub Child);

impl Running {
    /// Spawns `command`.
    pub fn spawn(command: &mut Command) -> Running {
        Running(command.spawn().expect("the binary starts"))
    }
}

impl std::ops::Deref for Running {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
