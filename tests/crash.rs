//! Crash safety through the real binary: `kill -9` at 20 moments of a tiny training run (at
//! least half of them inside checkpoint writes, counted), death at each point of a checkpoint
//! write, injected write and fsync errors, a real tmpfs filling up in the middle of a
//! checkpoint (root only), and damaged checkpoints. Every time, resuming must end with the
//! weights hash of an uninterrupted run, and nothing saved before the failure may be lost.

mod common;

use common::{hash, prepared_corpus, s, tmpdir};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Instant;

const CONFIG: &str = common::CRASH_TINY;

fn moelab(args: &[&str], fault: Option<&str>) -> Output {
    common::moelab_with(args, "2", fault)
}

fn train(data: &Path, run: &Path, resume: bool, fault: Option<&str>) -> Output {
    let mut args = vec![
        "train",
        "--config",
        CONFIG,
        "--data",
        s(data),
        "--out",
        s(run),
    ];
    if resume {
        args.push("--resume");
    }
    moelab(&args, fault)
}

/// Resumes (or, with no checkpoint yet, restarts) until the run finishes.
fn finish(data: &Path, run: &Path) -> Output {
    let has_ckpt = run.join("checkpoints").read_dir().is_ok_and(|mut d| {
        d.any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("step-")
        })
    });
    if !has_ckpt {
        let _ = std::fs::remove_dir_all(run);
    }
    let out = train(data, run, has_ckpt, None);
    assert!(
        out.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn step_of_latest(run: &Path) -> String {
    std::fs::read_to_string(run.join("latest"))
        .unwrap()
        .trim()
        .to_string()
}

/// Where a frozen or dead training process stands in a checkpoint write: the names in the
/// temp dir of a checkpoint (`.tmp-step-N-PID/`), or `latest.tmp.PID` while `latest` is
/// being replaced. None: outside any checkpoint write. (Only a finished write or the next
/// resume removes these, so after a SIGKILL they show exactly where the process died.)
fn checkpoint_write_in_progress(run: &Path) -> Option<String> {
    let names = |d: &Path| -> Vec<String> {
        d.read_dir().map_or(vec![], |rd| {
            let mut v: Vec<String> = rd
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect();
            v.sort();
            v
        })
    };
    let ckpts = run.join("checkpoints");
    if let Some(tmp) = names(&ckpts).into_iter().find(|n| n.starts_with(".tmp-")) {
        let inside = names(&ckpts.join(&tmp));
        return Some(format!("{tmp}/{{{}}}", inside.join(",")));
    }
    names(run)
        .into_iter()
        .find(|n| n.starts_with("latest.tmp."))
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: a signal to our own child, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

/// Freezes our child with SIGSTOP and waits until the kernel reports it stopped (every
/// thread: `waitid` with WSTOPPED reports the group stop only when it is complete; WNOWAIT
/// leaves the child to `Child::wait`). True: it is stopped, so it cannot exit or touch the
/// disk until killed. False: it exited first (a process already in its exit path ignores
/// SIGSTOP but is not reaped yet, so `try_wait` alone cannot tell; a CI run once "killed"
/// such a process and saw it exit 0).
fn freeze(pid: u32) -> bool {
    signal(pid, libc::SIGSTOP);
    // SAFETY: a zeroed siginfo_t is a valid out-parameter; the child is ours and unreaped.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WSTOPPED | libc::WEXITED | libc::WNOWAIT,
        )
    };
    assert_eq!(rc, 0, "waitid: {}", std::io::Error::last_os_error());
    info.si_code == libc::CLD_STOPPED
}

/// Regression (issue 11): the kill -9 test never checked that the process was still running
/// when killed, nor how many kills landed inside checkpoint writes. Now every kill is a real
/// SIGKILL of a live process (its exit status says so), half of the kills are aimed at
/// checkpoint writes, and at least half of all kills must land inside one.
#[test]
fn kill_9_anywhere_then_resume_gives_the_uninterrupted_weights() {
    use std::os::unix::process::ExitStatusExt;
    let d = tmpdir("crash", "kill");
    let data = prepared_corpus(&d, 3);
    let reference = d.join("reference");
    let t = Instant::now();
    let out = train(&data, &reference, false, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let span = t.elapsed();
    let want = hash(&reference);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20);
    let (kills, min_inside) = (20, 10);
    let (mut inside, mut inside_random, mut retries) = (0, 0, 0);
    for i in 0..kills {
        // even kills: a random moment of the run; odd kills: aimed at the write of a random
        // checkpoint (the test watches for its temp dir, then freezes the process)
        let aimed = i % 2 == 1;
        let run = d.join(format!("run-{i}"));
        let mut at = span.mul_f64(rng.gen_range(0.05..0.95));
        let target = 2 * rng.gen_range(2..=17u64); // a checkpoint step of the 40
        let delay = std::time::Duration::from_micros(rng.gen_range(0..2000));
        let (status, landed) = loop {
            let _ = std::fs::remove_dir_all(&run);
            let mut child = common::bin()
                .args([
                    "train",
                    "--config",
                    CONFIG,
                    "--data",
                    s(&data),
                    "--out",
                    s(&run),
                ])
                .env("RAYON_NUM_THREADS", "2")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let pid = child.id();
            // SIGSTOP freezes the process wherever it is (like a kill, it cannot be caught),
            // so the disk can be read at the very moment of the kill
            let frozen = if aimed {
                let mut frozen = false;
                while child.try_wait().unwrap().is_none() {
                    let due = std::fs::read_dir(run.join("checkpoints")).is_ok_and(|rd| {
                        rd.filter_map(|e| e.ok()).any(|e| {
                            let n = e.file_name().to_string_lossy().into_owned();
                            n.strip_prefix(".tmp-step-")
                                .and_then(|r| r.get(..7)?.parse::<u64>().ok())
                                .is_some_and(|step| step >= target)
                        })
                    });
                    if !due {
                        std::thread::sleep(std::time::Duration::from_micros(200));
                        continue;
                    }
                    std::thread::sleep(delay);
                    if !freeze(pid) {
                        break;
                    }
                    if checkpoint_write_in_progress(&run).is_some() {
                        frozen = true;
                        break;
                    }
                    // the write finished before the freeze: aim at the next checkpoint
                    signal(pid, libc::SIGCONT);
                }
                frozen
            } else {
                std::thread::sleep(at);
                freeze(pid)
            };
            // a stopped process cannot exit: it is alive when killed
            let alive = frozen;
            let landed = checkpoint_write_in_progress(&run);
            if alive {
                signal(pid, libc::SIGKILL);
            }
            let status = child.wait().unwrap();
            if alive {
                break (status, landed);
            }
            // the run finished before the moment came (a busy machine runs slower than the
            // reference did), or an aimed kill found the checkpoint write already done (a
            // fast disk writes one in a few ms): try again, earlier
            retries += 1;
            assert!(retries <= 30, "kill {i}: the run keeps finishing first");
            at /= 2;
        };
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "kill {i}: {status:?} is not death by SIGKILL"
        );
        let kind = if aimed { "aimed" } else { "random" };
        match &landed {
            Some(w) => {
                inside += 1;
                inside_random += !aimed as usize;
                eprintln!("kill {i} ({kind}): inside a checkpoint write: {w}");
            }
            None => eprintln!("kill {i} ({kind}, {at:?}): outside checkpoint writes"),
        }
        finish(&data, &run);
        assert_eq!(
            hash(&run),
            want,
            "kill {i} ({kind}, {landed:?}): resumed weights differ"
        );
        assert!(
            !run.join("checkpoints").read_dir().unwrap().any(|e| {
                e.unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".tmp-")
            }),
            "a temp dir of an interrupted checkpoint was left behind"
        );
    }
    eprintln!(
        "{inside} of {kills} kills landed inside a checkpoint write ({inside_random} of the {} random ones); {retries} retries",
        kills / 2
    );
    assert!(
        inside >= min_inside,
        "only {inside} of {kills} kills landed inside a checkpoint write (want at least {min_inside})"
    );
}

#[test]
fn death_at_every_point_of_a_checkpoint_write_loses_nothing() {
    let d = tmpdir("crash", "points");
    let data = prepared_corpus(&d, 3);
    let reference = d.join("reference");
    assert!(train(&data, &reference, false, None).status.success());
    let want = hash(&reference);
    for point in ["ckpt-model", "ckpt-state", "ckpt-renamed", "ckpt-latest"] {
        let run = d.join(point);
        let out = train(&data, &run, false, Some(&format!("{point}@12")));
        assert!(!out.status.success(), "{point}: the fault did not fire");
        // the previous checkpoint (or the new one, once `latest` names it) is intact
        let latest = step_of_latest(&run);
        let expect = if point == "ckpt-latest" {
            "step-0000012"
        } else {
            "step-0000010"
        };
        assert_eq!(latest, expect, "{point}");
        finish(&data, &run);
        assert_eq!(hash(&run), want, "{point}: resumed weights differ");
    }
}

/// Injected errors (not a real disk: see `a_real_full_file_system_...` for that) at the start
/// of the model file, before state.json, and a failing fsync of the model file (issue 11).
#[test]
fn an_injected_write_or_fsync_error_during_a_checkpoint_keeps_what_was_saved() {
    let d = tmpdir("crash", "enospc");
    let data = prepared_corpus(&d, 3);
    let reference = d.join("reference");
    assert!(train(&data, &reference, false, None).status.success());
    let want = hash(&reference);
    for (point, msg) in [
        ("enospc-model", "No space left on device"),
        ("enospc-state", "No space left on device"),
        ("eio-fsync", "model.safetensors: Input/output error"),
    ] {
        let run = d.join(point);
        let out = train(&data, &run, false, Some(&format!("{point}@16")));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(msg), "{point}: {err}");
        assert_eq!(step_of_latest(&run), "step-0000014");
        let names: Vec<String> = run
            .join("checkpoints")
            .read_dir()
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with(".tmp-")),
            "partial checkpoint left: {names:?}"
        );
        assert!(
            names.contains(&"step-0000010".to_string()),
            "older checkpoints kept: {names:?}"
        );
        finish(&data, &run);
        assert_eq!(hash(&run), want);
    }
}

/// Regression (issue 11): "fills the disk" used to be an injected error before a file was
/// written. Here the run lives on a real tmpfs that fills up in the middle of writing
/// checkpoint 12's model file, then (second round) its optimizer file: the kernel's short
/// write and ENOSPC reach the trainer through the real write path. Every earlier checkpoint
/// must stay byte for byte as it was, nothing partial may be left taking space, and resuming
/// (on a roomy disk, or in place once space is freed) must reach the uninterrupted weights.
/// Needs root to mount the tmpfs; without it the test says loudly that it proved nothing.
#[test]
fn a_real_full_file_system_during_a_checkpoint_keeps_what_was_saved() {
    const TEST: &str = "a_real_full_file_system_during_a_checkpoint_keeps_what_was_saved";
    let d = tmpdir("crash", "tmpfs");
    let data = prepared_corpus(&d, 3);
    let reference = d.join("reference");
    assert!(train(&data, &reference, false, None).status.success());
    let want = hash(&reference);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference.join("manifest.json")).unwrap())
            .unwrap();
    let size = |f: &str| {
        std::fs::metadata(reference.join("checkpoints/step-0000040").join(f))
            .unwrap()
            .len()
    };
    let (model, optim) = (size("model.safetensors"), size("optim.safetensors"));
    let small = match common::Tmpfs::mount(&d.join("small"), 8 * 1024) {
        Ok(m) => m,
        Err(why) => return common::skipped(TEST, &why),
    };
    const PAGE: u64 = 4096; // tmpfs allocates whole pages
    let pages = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len().div_ceil(PAGE));
    // (file that must fail midway, bytes of room for the checkpoint's files)
    for (file, room) in [
        ("model.safetensors", model / 2),
        ("optim.safetensors", model + optim / 2),
    ] {
        let run = small.dir.join("run");
        // checkpoints 2..10 complete, then the process dies (as at a kill)
        let out = train(&data, &run, false, Some("ckpt-latest@10"));
        assert!(
            !out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(step_of_latest(&run), "step-0000010");
        let saved = common::files_under(&run.join("checkpoints"));
        // fill the disk so that resuming has room for its metrics and manifest rewrites and
        // two steps of metrics, and then `room` bytes for checkpoint 12
        let overhead =
            PAGE * (pages(&run.join("metrics.jsonl")) + pages(&run.join("manifest.json")) + 3);
        let filler = small.dir.join("filler");
        let fill = small.free() - overhead - room;
        std::fs::write(&filler, vec![0xa5u8; fill as usize]).unwrap(); // not sparse: real pages
        let free = small.free();
        let out = train(&data, &run, true, None);
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "{file}: {free} bytes free on the tmpfs before resuming, of which ~{room} for checkpoint 12 ({file} is {} bytes)",
            if file == "model.safetensors" { model } else { optim }
        );
        assert_eq!(out.status.code(), Some(1), "{file}: {err}");
        assert!(
            err.contains("No space left on device")
                && err.contains(".tmp-step-0000012-")
                && err.contains(file),
            "{file}: the disk did not fill up while writing {file} of checkpoint 12: {err}"
        );
        // nothing saved before is touched, nothing partial is left
        assert_eq!(step_of_latest(&run), "step-0000010", "{file}");
        let after = common::files_under(&run.join("checkpoints"));
        let names = |v: &[(std::path::PathBuf, Vec<u8>)]| -> Vec<String> {
            v.iter().map(|(p, _)| p.display().to_string()).collect()
        };
        assert_eq!(
            names(&after),
            names(&saved),
            "{file}: checkpoint files changed"
        );
        assert!(after == saved, "{file}: a saved checkpoint's bytes changed");
        let leftovers: Vec<String> = common::files_under(&run)
            .into_iter()
            .map(|(p, _)| p.display().to_string())
            .filter(|p| p.contains(".tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "{file}: partial files left: {leftovers:?}"
        );
        let h10 = hash(&run.join("checkpoints/step-0000010"));
        assert_eq!(
            manifest["checkpoints"]["10"].as_str(),
            Some(h10.as_str()),
            "{file}: checkpoint 10 is not the uninterrupted run's"
        );
        // the run moved to a roomy disk resumes to the uninterrupted weights
        let moved = d.join(format!("moved-{file}"));
        common::copy_tree(&run, &moved);
        finish(&data, &moved);
        assert_eq!(hash(&moved), want, "{file}: resumed on a roomy disk");
        // so does the run in place once space is freed
        std::fs::remove_file(&filler).unwrap();
        finish(&data, &run);
        assert_eq!(hash(&run), want, "{file}: resumed after freeing space");
        std::fs::remove_dir_all(&run).unwrap();
    }
}

#[test]
fn a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one() {
    let d = tmpdir("crash", "damaged");
    let data = prepared_corpus(&d, 3);
    let reference = d.join("reference");
    assert!(train(&data, &reference, false, None).status.success());
    let want = hash(&reference);
    type Damage = fn(&Path);
    let damage: [(&str, Damage); 3] = [
        ("truncated model", |c| {
            let p = c.join("model.safetensors");
            let n = std::fs::metadata(&p).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(n / 2)
                .unwrap();
        }),
        ("flipped optimizer byte", |c| {
            let p = c.join("optim.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            let i = b.len() - 5;
            b[i] ^= 0x10;
            std::fs::write(&p, b).unwrap();
        }),
        ("edited state", |c| {
            let p = c.join("state.json");
            let t = std::fs::read_to_string(&p)
                .unwrap()
                .replace("\"tokens_seen\": ", "\"tokens_seen\": 1");
            std::fs::write(&p, t).unwrap();
        }),
    ];
    for (what, f) in damage {
        let run = d.join(what.replace(' ', "-"));
        // dies right after checkpoint 20 is complete
        assert!(!train(&data, &run, false, Some("ckpt-latest@20"))
            .status
            .success());
        f(&run.join("checkpoints/step-0000020"));
        let out = finish(&data, &run);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("step-0000020") && err.contains("falling back"),
            "{what}: {err}"
        );
        assert_eq!(hash(&run), want, "{what}");
    }
}

/// Regression (this session's format bump): runs written before state.json carried its own
/// checksum (checkpoint format 1) must still load and resume.
#[test]
fn checkpoints_of_the_previous_format_still_load_and_resume() {
    let d = tmpdir("crash", "format1");
    let data = prepared_corpus(&d, 3);
    let reference = d.join("reference");
    assert!(train(&data, &reference, false, None).status.success());
    let want = hash(&reference);
    let run = d.join("old");
    assert!(!train(&data, &run, false, Some("ckpt-latest@20"))
        .status
        .success());
    // rewrite every checkpoint's state.json as format 1 wrote it
    for e in run.join("checkpoints").read_dir().unwrap() {
        let p = e.unwrap().path().join("state.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let o = v.as_object_mut().unwrap();
        for k in ["checksum", "loss_ema", "skip_steps"] {
            o.remove(k);
        }
        o.insert("format_version".into(), 1.into());
        std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    }
    let o = moelab(&["hash", s(&run)], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    finish(&data, &run);
    assert_eq!(hash(&run), want, "resumed from format 1");
    let newest = run.join("checkpoints/step-0000040/state.json");
    assert!(std::fs::read_to_string(newest)
        .unwrap()
        .contains("\"format_version\": 2"));
    // a format from the future is refused, naming the versions read
    let p = run.join("checkpoints/step-0000040/state.json");
    let t = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"format_version\": 2", "\"format_version\": 9");
    std::fs::write(&p, t).unwrap();
    let o = moelab(&["hash", s(&run.join("checkpoints/step-0000040"))], None);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("format version 9, this moelab reads 1 to 3")
    );
}
