//! The server tests' harness: a model served on a free local port while a test talks to it.

use petal_io::LoadedModel;
use petal_serve::{Limits, Served, Stop};
use std::net::SocketAddr;
use std::time::Duration;

/// Stops the server when dropped, so a failed assertion ends the test instead of leaving the
/// server running (and the scope waiting for it).
struct StopOnDrop<'a>(&'a Stop);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Serves `lm` (as `tiny-llama`, `max_tokens` up to 256) with `limits` and `max_batch` while
/// `f` runs, given the address and the stop switch; the server starts taking requests only
/// `after` this long (requests sent meanwhile queue up). Then stops it; it must end by itself.
pub fn serving(
    lm: &LoadedModel,
    after: Duration,
    limits: Limits,
    max_batch: usize,
    f: impl FnOnce(SocketAddr, &Stop),
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Served {
        model: &lm.model,
        tokenizer: &lm.tokenizer,
        model_id: "tiny-llama".into(),
        max_batch,
        max_tokens: 256,
    };
    let stop = Stop::default();
    std::thread::scope(|s| {
        let st = stop.clone();
        let server = s.spawn(move || {
            std::thread::sleep(after);
            served.serve(listener, limits, st)
        });
        {
            let _stop = StopOnDrop(&stop);
            f(addr, &stop);
        }
        server.join().unwrap().unwrap();
    });
}
