//! Checks of the harness itself (they need no working `ferry`), so a failing e2e test points at
//! the binary, not at the helpers.

use crate::harness::*;

#[test]
fn random_bytes_are_deterministic_and_incompressible_looking() {
    let a = random_bytes(MIB as usize, 7);
    assert_eq!(a, random_bytes(MIB as usize, 7));
    assert_ne!(a, random_bytes(MIB as usize, 8));
    let mut counts = [0u32; 256];
    for &b in &a {
        counts[b as usize] += 1;
    }
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    assert!(
        *min > 3500 && *max < 4700,
        "byte histogram is flat: {min}..{max}"
    );
}

#[test]
fn disk_writes_and_comparison() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    let size = 3 * MIB + 12345;
    for p in [&a, &b] {
        std::fs::File::create(p).unwrap().set_len(size).unwrap();
    }
    assert_eq!(first_difference(&a, &b), None);
    write_random(&a, MIB + 5, 2 * MIB, 1);
    write_random(&b, MIB + 5, 2 * MIB, 1);
    assert_identical(&a, &b);
    assert_eq!(file_len(&a), size, "writes never grow the disk");
    write_pattern(&b, size - 1, 1, 9);
    assert_eq!(first_difference(&a, &b), Some(size - 1));
    zero_range(&a, MIB + 100, 10);
    assert_eq!(first_difference(&a, &b), Some(MIB + 100));
    assert_eq!(read_range(&a, MIB + 100, 10), vec![0u8; 10]);
    assert_ne!(digest(&a), digest(&b));
    let c = dir.path().join("c.raw");
    snapshot_file(&a, &c);
    assert_eq!(digest(&a), digest(&c));
    std::fs::File::options()
        .write(true)
        .open(&c)
        .unwrap()
        .set_len(size - 1)
        .unwrap();
    assert_eq!(
        first_difference(&a, &c),
        Some(size - 1),
        "length difference is a difference"
    );
}

#[test]
#[should_panic(expected = "more than one JSON document")]
fn two_json_documents_are_rejected() {
    parse_one_json("{\"a\":1}\n{\"b\":2}\n", &["x"]);
}

#[test]
#[should_panic(expected = "more than one JSON document")]
fn json_with_trailing_text_is_rejected() {
    parse_one_json("[1,2]\nDone.\n", &["x"]);
}

#[test]
fn one_json_document_is_accepted() {
    let v = parse_one_json("\n  {\"a\": [1, 2]}\n", &["x"]);
    assert_eq!(v["a"][1], 2);
}

#[test]
fn state_names_match_in_any_spelling() {
    for msg in [
        "error: app is in state failover_commit_pending; run `ferry commit app`",
        "error: app is FailoverCommitPending",
        "error: app: failover commit pending",
    ] {
        assert_mentions_state(msg, "failover_commit_pending");
    }
}

#[test]
fn error_line_check() {
    assert_error_line(
        "error: VM ghost does not exist; see `ferry vm list`\n",
        &["x"],
    );
    let r = std::panic::catch_unwind(|| assert_error_line("error: a\nhint: b\n", &["x"]));
    assert!(r.is_err(), "two lines are rejected");
    let r = std::panic::catch_unwind(|| assert_error_line("Error: a thing went wrong\n", &["x"]));
    assert!(r.is_err(), "must start with lower-case 'error: '");
}
