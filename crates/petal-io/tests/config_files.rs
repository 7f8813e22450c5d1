//! A config file is read only where it is a regular file of a config's size: a FIFO (which
//! would block the reader, a server's whole request loop with it) or a file of gigabytes is
//! refused without reading it.

use petal_io::adapter::{read_config_text, MAX_CONFIG_BYTES};

#[test]
fn a_fifo_or_an_oversized_config_is_refused_without_reading_it() {
    let d = tempfile::tempdir().unwrap();
    let ok = d.path().join("ok.json");
    std::fs::write(&ok, "{}").unwrap();
    assert_eq!(read_config_text(&ok).unwrap(), "{}");
    let big = d.path().join("big.json");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(MAX_CONFIG_BYTES + 1).unwrap(); // sparse: nothing is written
    let e = read_config_text(&big).unwrap_err().to_string();
    assert!(
        e.contains("big.json") && e.contains("more than a config holds"),
        "{e}"
    );
    let e = read_config_text(d.path()).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let fifo = d.path().join("fifo.json");
    match std::process::Command::new("mkfifo").arg(&fifo).status() {
        Ok(s) if s.success() => {
            let e = read_config_text(&fifo).unwrap_err().to_string();
            assert!(e.contains("fifo.json: not a regular file"), "{e}");
        }
        _ => eprintln!("no mkfifo here: the FIFO case is not checked"),
    }
}
