//! A grid on a real Slurm: a single-node cluster on this machine (munged, slurmctld and slurmd
//! with a throwaway configuration, state and ports of its own in a temporary folder), the
//! repository's `scripts/slurm/grid.sbatch` submitted as a three-task array over a tiny-model
//! grid, and `scripts/slurm/finish.sbatch` as the job that depends on it (merge, then compare
//! with JSON and BMF outputs). The merged store must hold the same cells and the same metric and
//! sample rows as a single-process run of the same grid.
//!
//! Without Slurm (`sbatch`, `slurmctld`, `slurmd`, `munged` on PATH) the test prints a note and
//! passes, unless `CI` is set: `.ci/run` installs Debian's `slurm-wlm`.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use mlbench::runner::store::Store;

/// Whether `CI` is set to something other than empty, `0` or `false`.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .env("PATH", path_with_sbin())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// PATH with the sbin folders, where Debian puts the daemons.
fn path_with_sbin() -> String {
    format!(
        "{}:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sh(cmd: &str, env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new("sh");
    c.args(["-c", cmd]).env("PATH", path_with_sbin());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// A single-node cluster; its daemons are stopped when it is dropped.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let host = String::from_utf8(sh("hostname -s", &[]).stdout)
            .unwrap()
            .trim()
            .to_string();
        let user = String::from_utf8(sh("id -un", &[]).stdout)
            .unwrap()
            .trim()
            .to_string();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        for sub in ["spool", "state", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let d = dir.display();
        let conf = dir.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=mlbenchtest\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={}\nSlurmdPort={}\n\
                 AuthType=auth/munge\nSlurmUser={user}\nSlurmdUser={user}\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nMpiDefault=none\n\
                 SchedulerType=sched/backfill\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n\
                 JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n\
                 ReturnToService=2\nSlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
                 SlurmdSpoolDir={d}/spool\nStateSaveLocation={d}/state\n\
                 SlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd.log\n\
                 NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN\n\
                 PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES\n",
                free_port(),
                free_port()
            ),
        )
        .unwrap();
        // munge: the machine's daemon when it answers, else one started here.
        if !sh("munge -n | unmunge", &[]).status.success() {
            let o = sh("mkdir -p /run/munge && munged --force", &[]);
            assert!(
                o.status.success(),
                "munged: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let conf_s = conf.to_str().unwrap();
        for daemon in [
            format!("slurmctld -f {conf_s}"),
            format!("slurmd -f {conf_s}"),
        ] {
            let o = sh(&daemon, &[]);
            assert!(
                o.status.success(),
                "{daemon}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let c = Cluster {
            dir: dir.to_path_buf(),
            conf,
        };
        let t0 = Instant::now();
        loop {
            let o = c.client("sinfo -h -o %t");
            if String::from_utf8_lossy(&o.stdout).trim() == "idle" {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "the node never became idle: {}\n{}",
                String::from_utf8_lossy(&o.stdout),
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        c
    }

    /// A Slurm client command against this cluster.
    fn client(&self, cmd: &str) -> std::process::Output {
        sh(cmd, &[("SLURM_CONF", self.conf.to_str().unwrap())])
    }

    fn logs(&self) -> String {
        ["slurmctld.log", "slurmd.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.join("log").join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Submits `args` with sbatch; returns the job id.
    fn sbatch(&self, args: &str) -> String {
        let o = self.client(&format!("sbatch --parsable {args}"));
        assert!(
            o.status.success(),
            "sbatch {args}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    }

    /// Waits until no job of the cluster is queued or running.
    fn drain(&self, within: Duration) {
        let t0 = Instant::now();
        loop {
            let o = self.client("squeue -h -o %i");
            if o.status.success() && String::from_utf8_lossy(&o.stdout).trim().is_empty() {
                return;
            }
            assert!(
                t0.elapsed() < within,
                "jobs still queued: {}",
                String::from_utf8_lossy(&o.stdout)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for pid in ["slurmd.pid", "slurmctld.pid"] {
            if let Ok(p) = std::fs::read_to_string(self.dir.join(pid)) {
                let _ = sh(&format!("kill {}", p.trim()), &[]);
            }
        }
    }
}

#[test]
fn a_slurm_array_and_its_dependent_merge_give_the_single_process_store() {
    let tools = ["sbatch", "squeue", "sinfo", "slurmctld", "slurmd", "munged"];
    if let Some(t) = tools.iter().find(|t| !have(t)) {
        assert!(
            !in_ci(),
            "CI needs a real Slurm ({t} is missing): install slurm-wlm"
        );
        eprintln!("note: {t} not found; the Slurm test is skipped (install slurm-wlm to run it)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = toy_data(dir, &[("train", 4), ("test", 2)]);
    let model = tiny_llama(dir);
    let exp = dir.join("exp.toml");
    std::fs::write(
        &exp,
        format!(
            "name = \"onslurm\"\nmodel = {:?}\ntasks = [\"toy\"]\nlangs = [\"en\", \"fr\"]\n\
             methods = [\"base\", \"lora-k\"]\nks = [2]\nseeds = [0, 1]\n\
             [train]\npasses = 1.0\n[method.lora-k]\nbatch_size = 4\nmicro_batch = 4\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_mlbench");
    // The single-process reference.
    let reference = dir.join("reference");
    let o = mlbench(&[
        "--data-dir",
        data.to_str().unwrap(),
        "-q",
        "run",
        exp.to_str().unwrap(),
        "--store",
        reference.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cells = Store::new(&reference).finished();
    assert_eq!(cells.len(), 3, "base + lora-k x 2 seeds");

    let cluster = Cluster::start(&dir.join("slurm"));
    let repo = env!("CARGO_MANIFEST_DIR");
    let store = dir.join("store");
    let report = dir.join("report");
    let env = format!(
        "ALL,EXP={},STORE={},BIN={bin},MLBENCH_DATA={},NAME=onslurm,OUT={},GATE=0",
        exp.display(),
        store.display(),
        data.display(),
        report.display()
    );
    let logs = dir.join("slurm/log").display().to_string();
    let grid = cluster.sbatch(&format!(
        "--array=0-2 --cpus-per-task=1 --mem=500M --chdir={repo} --export={env} \
         --output={logs}/grid-%A_%a.log {repo}/scripts/slurm/grid.sbatch"
    ));
    cluster.sbatch(&format!(
        "--dependency=afterok:{grid} --cpus-per-task=1 --mem=500M --chdir={repo} \
         --export={env} --output={logs}/finish.log {repo}/scripts/slurm/finish.sbatch"
    ));
    cluster.drain(Duration::from_secs(600));
    let job_logs: String = std::fs::read_dir(dir.join("slurm/log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .map(|p| format!("{}:\n{}", p.display(), std::fs::read_to_string(&p).unwrap()))
        .collect();
    // Each task ran its own shard; the finish job merged and compared.
    for task in 0..3 {
        assert!(
            job_logs.contains(&format!("shard {task}/3 from the Slurm array")),
            "{job_logs}"
        );
    }
    assert!(
        report.with_extension("json").exists(),
        "{job_logs}\n{}",
        cluster.logs()
    );
    assert!(report.with_extension("bmf.json").exists(), "{job_logs}");
    assert!(
        store.join("parts").exists(),
        "the finish job merged: {job_logs}"
    );
    assert_eq!(Store::new(&store).finished(), cells);
    for (file, order) in [
        ("metrics.parquet", &["key", "task", "lang", "metric"][..]),
        ("samples.parquet", &["key", "task", "lang", "id"][..]),
    ] {
        let (got, want) = (
            store_rows(&store, file, order),
            store_rows(&reference, file, order),
        );
        assert!(got.equals_missing(&want), "{file}:\n{got}\n{want}");
    }
}
