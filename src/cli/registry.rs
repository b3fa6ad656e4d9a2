//! `graven image push` and `graven image pull`: the CLI's side of `crate::registry`, with the
//! progress of large blobs on stderr (a bar on a terminal, a line per quarter otherwise).

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;

use crate::registry::{BlobProgress, ProgressFn, RemoteRef};
use crate::store::{Digest, Store};

/// A remote name, which must name its registry's host.
fn remote(text: &str) -> anyhow::Result<RemoteRef> {
    RemoteRef::parse(text)?.with_context(|| {
        format!(
            "{text:?} names no registry: write its host first (127.0.0.1:5000/{text}, docker.io/library/{text})"
        )
    })
}

/// Progress of the blob moving now, reported on stderr.
fn progress(verb: &'static str) -> ProgressFn {
    let terminal = std::io::stderr().is_terminal();
    let current: Mutex<Option<(Digest, u64, Option<indicatif::ProgressBar>)>> = Mutex::new(None);
    Arc::new(move |p: &BlobProgress| {
        let mut current = current.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_none_or(|(d, _, _)| d != &p.digest) {
            let bar = terminal.then(|| {
                let bar = indicatif::ProgressBar::new(p.total);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} {bytes}/{total_bytes} {bar:30} {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar.set_message(format!("{verb} {}", p.digest.short()));
                bar
            });
            *current = Some((p.digest.clone(), 0, bar));
        }
        let Some((_, quarter, bar)) = current.as_mut() else {
            return;
        };
        match bar {
            Some(bar) => {
                bar.set_position(p.done);
                if p.done >= p.total {
                    bar.finish();
                }
            }
            None => {
                let now = p.done * 4 / p.total.max(1);
                if now > *quarter || p.done == 0 {
                    *quarter = now;
                    eprintln!("{verb} {} {}/{} bytes", p.digest.short(), p.done, p.total);
                }
            }
        }
    })
}

pub fn push(home: &Path, reference: &str, target: &str, json: bool) -> anyhow::Result<ExitCode> {
    let store = Store::open(home)?;
    let digest = store.resolve(reference)?;
    let target = remote(target)?;
    let pushed = crate::registry::push(&store, &digest, &target, Some(progress("pushing")))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&pushed)?);
    } else {
        eprintln!(
            "pushed {} ({} blobs sent, {} the registry had)",
            pushed.reference, pushed.pushed_blobs, pushed.skipped_blobs
        );
        println!("{}", pushed.digest);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Serialize)]
struct PullOutput {
    reference: String,
    tag: Option<String>,
    #[serde(flatten)]
    pulled: crate::registry::Pulled,
}

pub fn pull(
    home: &Path,
    reference: &str,
    tag: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let store = Store::open(home)?;
    let remote = remote(reference)?;
    let mut txn = store.transaction()?;
    let pulled = crate::registry::pull(&mut txn, &remote, Some(progress("pulling")))?;
    // Tagged as written (without the digest), so a later `FROM` of the same name finds it
    // in the store without asking the registry, as Docker does.
    let tag = tag.or_else(|| remote.tagged_name());
    if let Some(tag) = &tag {
        store.tag(tag, &pulled.digest, Some(reference))?;
    }
    txn.commit();
    if json {
        let out = PullOutput {
            reference: reference.to_owned(),
            tag,
            pulled,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{} {}", tag.as_deref().unwrap_or(reference), pulled.digest);
    }
    Ok(ExitCode::SUCCESS)
}
