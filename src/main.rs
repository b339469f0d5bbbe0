//! `tandem`: the command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;
mod disk_cmd;
mod log_inspect;

// The libraries under the names the binary has always used for them.
use tandem_config as config;
use tandem_ft as ft;

pub use ft::exit::{
    EXIT_DIVERGED, EXIT_GUEST_CRASH, EXIT_REPLAY_TRUNCATED, EXIT_START_FAILED, EXIT_VMM_ERROR,
};

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "A fault-tolerant KVM virtual machine monitor"
)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace). Logs go to stderr.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a VM on this host (unprotected), optionally recording it.
    Run(cli::RunArgs),
    /// Replay a recorded log: the guest prints what it printed and exits as it exited.
    Replay(cli::ReplayArgs),
    /// Look into record/replay logs.
    #[command(subcommand)]
    Log(LogCommand),
    /// Serve as the arbiter (witness) of fault-tolerant pairs: grants VM generations.
    Witness(ft::arbiter::WitnessArgs),
    /// Start this host as the primary of a fresh pair.
    Primary(ft::cmd::PairArgs),
    /// Start this host as the secondary of a fresh pair.
    Secondary(ft::cmd::PairArgs),
    /// (Re)start this host in whatever role the arbiter's record gives it.
    Pair(ft::cmd::PairArgs),
    /// Run this host's side of every VM of a cluster file (active/active:
    /// primaries it prefers, secondaries of the others), restarting them.
    Node(ft::node::NodeArgs),
    /// Hand a VM of a cluster to the other host without loss.
    Move(ft::node::MoveArgs),
    /// Hand the VM from the live host to its secondary without loss (for
    /// upgrading or servicing the live host); it re-joins with `tandem pair`.
    Switchover(ft::cmd::SwitchoverArgs),
    /// Compare mirrored replicas (`verify`), or hash one for a comparison
    /// on another host (`hashes`).
    #[command(subcommand)]
    Disk(disk_cmd::DiskCommand),
    /// Where each host of a pair stands (role, generation, peer, figures).
    Status(ft::cmd::StatusArgs),
    /// Write a new random pre-shared key for `[ft] psk_file` (mode 0600;
    /// copy the same file to both hosts), or with `--witness-key-for` the
    /// key a witness needs for that pair (derived from its psk_file; it
    /// does not reveal the replication key).
    Keygen {
        /// Where to write it (never overwritten).
        file: std::path::PathBuf,
        /// The pair file whose witness key to write.
        #[arg(long, value_name = "PAIR_FILE")]
        witness_key_for: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum LogCommand {
    /// Summarise a log: identity, records and bytes by kind, stops, damage.
    Inspect {
        /// The log file.
        file: std::path::PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match cli.command {
        Command::Run(args) => cli::run(args),
        Command::Replay(args) => cli::replay(args),
        Command::Log(LogCommand::Inspect { file, json }) => log_inspect::run(&file, json),
        Command::Witness(args) => ft::arbiter::witness_command(args),
        Command::Primary(args) => ft::cmd::run(ft::cmd::Role::Primary, args),
        Command::Secondary(args) => ft::cmd::run(ft::cmd::Role::Secondary, args),
        Command::Pair(args) => ft::cmd::run(ft::cmd::Role::FromArbiter, args),
        Command::Status(args) => ft::cmd::status(args),
        Command::Disk(command) => disk_cmd::run(command),
        Command::Switchover(args) => ft::cmd::switchover(args),
        Command::Node(args) => ft::node::node(args),
        Command::Move(args) => ft::node::move_vm(args),
        Command::Keygen {
            file,
            witness_key_for: None,
        } => match ft::auth::keygen(&file) {
            Ok(()) => {
                println!("wrote a new key to {}", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tandem: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Keygen {
            file,
            witness_key_for: Some(pair_file),
        } => match ft::auth::write_witness_key(&pair_file, &file) {
            Ok(vm) => {
                println!("wrote the witness key of {vm} to {}", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tandem: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
