//! Loss masks, packing, splitting and the readers' errors, on the golden fixture's word-level
//! tokenizer (token "wN" has id N; BOS w1, EOS w2).

use petal_data::{
    batches, load_examples, pack, split, ChatTemplate, DataOptions, Example, Tokenizer, IGNORE,
};
use std::io::Write;
use std::path::{Path, PathBuf};

fn tok() -> Tokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden/llama");
    let mut t = Tokenizer::from_hf_folder(&dir).unwrap();
    let tmpl = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant {% endif %}";
    t.chat_template = Some(ChatTemplate::new(tmpl, "w1".into(), "w2".into()).unwrap());
    t
}

fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    p
}

fn opts(n: usize) -> DataOptions {
    DataOptions {
        max_seq_len: n,
        pack: false,
    }
}

#[test]
fn prompt_completion_examples_carry_loss_only_on_the_completion_and_eos() {
    let d = tempfile::tempdir().unwrap();
    let p = file(
        d.path(),
        "a.jsonl",
        "{\"prompt\": \"w3 w4\", \"completion\": \"w5 w6\"}\n",
    );
    let ex = load_examples(&p, &tok(), &opts(64)).unwrap();
    assert_eq!(ex[0].ids, vec![3, 4, 5, 6, 2]);
    assert_eq!(ex[0].labels, vec![IGNORE, IGNORE, 5, 6, 2]);
}

#[test]
fn chat_examples_carry_loss_only_on_assistant_turns() {
    let d = tempfile::tempdir().unwrap();
    let line = r#"{"messages": [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7 w8"}, {"role": "user", "content": "w9"}, {"role": "assistant", "content": "w10"}]}"#;
    let p = file(d.path(), "c.jsonl", &format!("{line}\n"));
    let ex = load_examples(&p, &tok(), &opts(64)).unwrap();
    // "user w5 w6 assistant w7 w8 user w9 assistant w10": role words are unknown (id 0)
    assert_eq!(ex[0].ids, vec![0, 5, 6, 0, 7, 8, 0, 9, 0, 10]);
    let i = IGNORE;
    assert_eq!(ex[0].labels, vec![i, i, i, i, 7, 8, i, i, i, 10]);
}

#[test]
fn text_files_are_cut_into_windows_and_jsonl_is_truncated_to_max_len() {
    let d = tempfile::tempdir().unwrap();
    let words: Vec<String> = (3..13).map(|i| format!("w{i}")).collect();
    let p = file(d.path(), "t.txt", &words.join(" "));
    let ex = load_examples(&p, &tok(), &opts(4)).unwrap();
    assert_eq!(
        ex.iter().map(|e| e.ids.clone()).collect::<Vec<_>>(),
        vec![vec![3, 4, 5, 6], vec![7, 8, 9, 10], vec![11, 12]]
    );
    let p = file(d.path(), "j.jsonl", "{\"text\": \"w3 w4 w5 w6 w7\"}\n");
    assert_eq!(
        load_examples(&p, &tok(), &opts(3)).unwrap()[0].ids,
        vec![3, 4, 5]
    );
}

#[test]
fn packing_joins_examples_with_eos_up_to_the_window() {
    let e = |v: &[u32]| Example {
        ids: v.to_vec(),
        labels: v.iter().map(|&x| x as i64).collect(),
        task: None,
    };
    let packed = pack(vec![e(&[3, 4]), e(&[5]), e(&[6, 7, 8])], 5, Some(2));
    assert_eq!(packed[0].ids, vec![3, 4, 2, 5]);
    assert_eq!(packed[0].labels, vec![3, 4, IGNORE, 5]);
    assert_eq!(packed[1].ids, vec![6, 7, 8]);
}

#[test]
fn the_split_is_seeded_disjoint_and_complete_and_batches_pad_with_ignored_labels() {
    let ex: Vec<Example> = (0..20)
        .map(|i| Example {
            ids: vec![i, i + 1],
            labels: vec![i as i64, (i + 1) as i64],
            task: None,
        })
        .collect();
    let (t1, v1) = split(ex.clone(), 0.25, 7);
    let (t2, v2) = split(ex.clone(), 0.25, 7);
    assert_eq!((t1.len(), v1.len()), (15, 5));
    assert_eq!(v1, v2);
    assert_eq!(t1, t2);
    let mut all: Vec<u32> = t1.iter().chain(&v1).map(|e| e.ids[0]).collect();
    all.sort();
    assert_eq!(all, (0..20).collect::<Vec<_>>());
    let b = &batches(
        &[
            Example {
                ids: vec![3],
                labels: vec![3],
                task: None,
            },
            Example {
                ids: vec![4, 5],
                labels: vec![4, 5],
                task: None,
            },
        ],
        2,
        0,
    )[0];
    assert_eq!(b.ids, vec![3, 0, 4, 5]);
    assert_eq!(b.labels, vec![3, IGNORE, 4, 5]);
}

fn err(text: &str) -> String {
    let d = tempfile::tempdir().unwrap();
    let p = file(d.path(), "bad.jsonl", text);
    load_examples(&p, &tok(), &opts(64))
        .unwrap_err()
        .to_string()
}

#[test]
fn malformed_jsonl_names_the_file_and_line() {
    let e = err("{\"text\": \"w3\"}\n{\"text\": \"w4\"\n");
    assert!(
        e.contains("bad.jsonl:2") && e.contains("malformed JSON"),
        "{e}"
    );
}

#[test]
fn missing_fields_and_chats_without_an_assistant_turn_are_refused_by_line() {
    let e = err("{\"prompt\": \"w3\"}\n");
    assert!(e.contains("bad.jsonl:1") && e.contains("completion"), "{e}");
    let e = err("{\"foo\": 1}\n");
    assert!(e.contains("expected one of the fields"), "{e}");
    let e = err("{\"messages\": [{\"role\": \"user\", \"content\": \"w3\"}]}\n");
    assert!(e.contains("no assistant turn"), "{e}");
    let e = err("{\"messages\": [{\"role\": \"usr\", \"content\": \"w3\"}, {\"role\": \"assistant\", \"content\": \"w4\"}]}\n");
    assert!(e.contains("bad.jsonl:1") && e.contains("role `usr`"), "{e}");
}

#[test]
fn an_empty_dataset_is_an_error() {
    let e = err("\n\n");
    assert!(
        e.contains("no examples to learn from: the file holds none"),
        "{e}"
    );
}

#[test]
fn examples_whose_scored_part_falls_past_the_sequence_length_say_so() {
    let d = tempfile::tempdir().unwrap();
    let p = file(
        d.path(),
        "late.jsonl",
        "{\"prompt\": \"w1 w2 w3 w4 w5 w6 w7 w8\", \"completion\": \"w9\"}\n",
    );
    let e = load_examples(&p, &tok(), &opts(4)).unwrap_err().to_string();
    assert!(
        e.contains("late.jsonl")
            && e.contains("none of its 1 examples")
            && e.contains("raise --seq-len"),
        "{e}"
    );
}

#[test]
fn a_task_field_tags_each_example_and_packing_keeps_tasks_apart() {
    let d = tempfile::tempdir().unwrap();
    let p = file(
        d.path(),
        "m.jsonl",
        "{\"text\": \"w3 w4\", \"task\": \"a\"}\n{\"text\": \"w5\", \"task\": \"b\"}\n{\"prompt\": \"w6\", \"completion\": \"w7\", \"task\": \"a\"}\n",
    );
    let ex = load_examples(&p, &tok(), &opts(64)).unwrap();
    let t: Vec<_> = ex.iter().map(|e| e.task.as_deref().unwrap()).collect();
    assert_eq!(t, ["a", "b", "a"]);
    assert_eq!(petal_data::tasks(&ex), ["a", "b"]);
    let packed = load_examples(
        &p,
        &tok(),
        &DataOptions {
            max_seq_len: 64,
            pack: true,
        },
    )
    .unwrap();
    // task a's two examples in one window, task b's alone
    assert_eq!(packed.len(), 2);
    assert_eq!(packed[0].task.as_deref(), Some("a"));
    assert_eq!(packed[0].ids, vec![3, 4, 2, 2, 6, 7, 2]);
    assert_eq!(packed[1].task.as_deref(), Some("b"));
}

#[test]
fn some_lines_with_a_task_and_some_without_or_a_non_string_task_are_refused_naming_the_line() {
    let d = tempfile::tempdir().unwrap();
    for (text, line, what) in [
        (
            "{\"text\": \"w3\", \"task\": \"a\"}\n{\"text\": \"w4\"}\n",
            2,
            "has none",
        ),
        ("{\"text\": \"w3\", \"task\": 3}\n", 1, "`task`"),
        ("{\"text\": \"w3\", \"task\": \" \"}\n", 1, "`task`"),
    ] {
        let p = file(d.path(), "bad.jsonl", text);
        let e = load_examples(&p, &tok(), &opts(64))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("bad.jsonl:{line}")) && e.contains(what),
            "{e}"
        );
    }
}

#[test]
fn balanced_order_gives_every_task_the_same_share_whatever_its_size() {
    let mk = |task: &str, n: usize| -> Vec<Example> {
        (0..n)
            .map(|i| Example {
                ids: vec![i as u32],
                labels: vec![i as i64],
                task: Some(task.to_string()),
            })
            .collect()
    };
    let ex: Vec<Example> = [mk("big", 30), mk("small", 3), mk("mid", 9)].concat();
    let order = petal_data::balanced_order(&ex, 5);
    assert_eq!(order.len(), ex.len());
    // every window of three slots holds each task once
    for w in order.chunks(3).filter(|w| w.len() == 3) {
        let mut t: Vec<_> = w.iter().map(|&i| ex[i].task.clone().unwrap()).collect();
        t.sort();
        assert_eq!(t, ["big", "mid", "small"]);
    }
    // the small task's three examples are all used, in turns
    let small: std::collections::BTreeSet<usize> = order
        .iter()
        .copied()
        .filter(|&i| ex[i].task.as_deref() == Some("small"))
        .collect();
    assert_eq!(small.len(), 3);
    assert_eq!(order, petal_data::balanced_order(&ex, 5), "seeded");
}

#[test]
fn choosing_tasks_keeps_theirs_and_refuses_a_task_the_data_lacks_naming_it() {
    let ex: Vec<Example> = ["a", "b", "a", "c"]
        .iter()
        .enumerate()
        .map(|(i, t)| Example {
            ids: vec![i as u32],
            labels: vec![i as i64],
            task: Some(t.to_string()),
        })
        .collect();
    let kept = petal_data::select_tasks(ex.clone(), &["a".into(), "c".into()], "--tasks").unwrap();
    assert_eq!(kept.iter().map(|e| e.ids[0]).collect::<Vec<_>>(), [0, 2, 3]);
    let e = petal_data::select_tasks(ex, &["z".into()], "--tasks")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`z`") && e.contains("a, b, c"), "{e}");
    let plain = vec![Example::default()];
    let e = petal_data::select_tasks(plain, &["a".into()], "--tasks")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no `task` field"), "{e}");
}
