//! The scenarios' command-line arguments, each turned into a [`Plan`] for [`crate::run`].
//!
//! | scenario | connections | traffic during the run |
//! |---|---|---|
//! | `connect` | `--conns` idle users | none: held `--hold` seconds while node CPU is sampled |
//! | `fanout` | `--subs` subscribers of `--topic` | `--pubs` API publications, each sent once the previous reached every subscriber |
//! | `p2p` | `--users` users | `--msgs` direct messages at `--rate`, via the API or client `send` frames (`--via`); or, `--to topics`, API publications to each user's own topic |
//! | `churn` | `--users` users | direct messages as in `p2p`, while `--churn-rate` connections a second open and close |
//! | `mixed` | subscribers and users | publications at `--pub-rate`, direct messages, churn, all at once |
//! | `up` | `--users` users | `up` frames at `--rate` to the nodes' upstream sink (options and plan in [`crate::up`]) |

use std::time::Duration;

use anyhow::{ensure, Result};

use crate::client::Population;
use crate::run::{Direct, Fanout, Pace, Plan, To, Via};

/// `connect`: idle connections.
#[derive(clap::Args, Debug)]
pub struct ConnectArgs {
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// Handshakes per second, all workers together (0: as fast as they go).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Seconds to hold them idle while sampling the nodes' CPU.
    #[arg(long, default_value_t = 20)]
    hold: u64,
    /// Seconds to wait after the last handshake before reading the nodes' RSS.
    #[arg(long, default_value_t = 2)]
    settle: u64,
}

/// `fanout`: topic publications to many subscribers.
#[derive(clap::Args, Debug)]
pub struct FanoutArgs {
    /// Subscribers.
    #[arg(long, default_value_t = 10_000)]
    subs: usize,
    /// Publications, each sent once the previous one reached every subscriber.
    #[arg(long, default_value_t = 20)]
    pubs: usize,
    /// Topic name.
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Seconds to wait for a publication to reach everyone before going on without it.
    #[arg(long, default_value_t = 10)]
    drain: u64,
}

/// Direct-message traffic, shared by `p2p`, `churn` and `mixed`.
#[derive(clap::Args, Debug)]
pub struct DirectArgs {
    /// Direct messages in the run.
    #[arg(long, default_value_t = 10_000)]
    msgs: u64,
    /// Direct messages per second, all senders together.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Who sends them: the HTTP API (`{"users":[u],"data":..}`) or clients (`send` frames,
    /// each user's connection in turn; mind the node's per-connection rate limit).
    #[arg(long, value_enum, default_value_t = Via::Api)]
    via: Via,
    /// Keep-alive HTTP connections posting when `--via api`.
    #[arg(long, default_value_t = 4)]
    api_conns: usize,
    /// Messages per `POST /v1/publish` when `--via api` (more than 1: a batch, an array of
    /// publications; a message waits until its batch is full, so latency grows with it).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Seconds to wait for deliveries after the last send.
    #[arg(long, default_value_t = 5)]
    drain: u64,
}

impl DirectArgs {
    fn direct(&self) -> Direct {
        Direct {
            count: self.msgs,
            rate: self.rate,
            via: self.via,
            api_conns: self.api_conns,
            batch: self.batch.max(1),
            to: To::Users,
        }
    }
}

/// `p2p`: direct messages between users.
#[derive(clap::Args, Debug)]
pub struct P2pArgs {
    /// Users online (one connection each).
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    #[command(flatten)]
    direct: DirectArgs,
    /// Whom the API addresses each message to: the user (`{"users":["p7"],..}`, a `msg`
    /// frame), or, with `topics`, the user's own topic (`{"topics":["t-p7"],..}`, a `pub`
    /// frame), to which every user's connection subscribes right after connecting (the
    /// traffic starts once every subscription is acknowledged). `--via api` only.
    #[arg(long, value_enum, default_value_t = To::Users)]
    to: To,
}

/// Churn options, shared by `churn` and `mixed`.
#[derive(clap::Args, Debug)]
pub struct ChurnArgs {
    /// Connections opened (and later closed) per second, all workers together.
    #[arg(long, default_value_t = 200.0)]
    churn_rate: f64,
    /// Milliseconds each churn connection stays open.
    #[arg(long, default_value_t = 1000)]
    churn_life_ms: u64,
}

/// `churn`: a connect/disconnect storm while direct messages flow.
#[derive(clap::Args, Debug)]
pub struct ChurnScenarioArgs {
    /// Users online for the whole run (the message recipients).
    #[arg(long, default_value_t = 5_000)]
    users: usize,
    #[command(flatten)]
    churn: ChurnArgs,
    #[command(flatten)]
    direct: DirectArgs,
}

/// `mixed`: fan-out, direct messages and churn at once.
#[derive(clap::Args, Debug)]
pub struct MixedArgs {
    /// Subscribers of `--topic`.
    #[arg(long, default_value_t = 5_000)]
    subs: usize,
    /// Users receiving direct messages.
    #[arg(long, default_value_t = 5_000)]
    users: usize,
    /// Topic publications (via the API).
    #[arg(long, default_value_t = 50)]
    pubs: usize,
    /// Topic publications per second.
    #[arg(long, default_value_t = 10.0)]
    pub_rate: f64,
    /// Topic name.
    #[arg(long, default_value = "bench")]
    topic: String,
    #[command(flatten)]
    churn: ChurnArgs,
    #[command(flatten)]
    direct: DirectArgs,
}

fn population(subs: usize, users: usize, topic: &str) -> Population {
    Population {
        subs,
        users,
        topic: topic.to_owned(),
        user_topics: false,
    }
}

fn positive(what: &str, value: f64) -> Result<()> {
    ensure!(
        value > 0.0 && value.is_finite(),
        "{what} must be a positive number"
    );
    Ok(())
}

impl ConnectArgs {
    /// The run's plan.
    pub fn plan(&self) -> Result<Plan> {
        ensure!(self.conns > 0, "--conns must be positive");
        Ok(Plan {
            scenario: "connect",
            population: population(0, self.conns, "bench"),
            connect_rate: self.rate,
            settle: Duration::from_secs(self.settle),
            hold: Duration::from_secs(self.hold),
            fanout: None,
            direct: None,
            churn: None,
            drain: Duration::ZERO,
            up: None,
        })
    }
}

impl FanoutArgs {
    /// The run's plan.
    pub fn plan(&self) -> Result<Plan> {
        ensure!(
            self.subs > 0 && self.pubs > 0,
            "--subs and --pubs must be positive"
        );
        Ok(Plan {
            scenario: "fanout",
            population: population(self.subs, 0, &self.topic),
            connect_rate: 0.0,
            settle: Duration::from_secs(1),
            hold: Duration::ZERO,
            fanout: Some(Fanout {
                pubs: self.pubs,
                pace: Pace::Lockstep,
            }),
            direct: None,
            churn: None,
            drain: Duration::from_secs(self.drain),
            up: None,
        })
    }
}

impl P2pArgs {
    /// The run's plan.
    pub fn plan(&self) -> Result<Plan> {
        ensure!(self.users >= 2, "--users must be at least 2");
        positive("--rate", self.direct.rate)?;
        ensure!(
            self.to == To::Users || self.direct.via == Via::Api,
            "--to topics publishes to the users' topics through the HTTP API: it needs \
             --via api (client send frames only address users)"
        );
        let mut population = population(0, self.users, "bench");
        population.user_topics = self.to == To::Topics;
        Ok(Plan {
            scenario: "p2p",
            population,
            connect_rate: 0.0,
            settle: Duration::from_secs(1),
            hold: Duration::ZERO,
            fanout: None,
            direct: Some(Direct {
                to: self.to,
                ..self.direct.direct()
            }),
            churn: None,
            drain: Duration::from_secs(self.direct.drain),
            up: None,
        })
    }
}

impl ChurnScenarioArgs {
    /// The run's plan.
    pub fn plan(&self) -> Result<Plan> {
        ensure!(self.users >= 2, "--users must be at least 2");
        positive("--rate", self.direct.rate)?;
        positive("--churn-rate", self.churn.churn_rate)?;
        Ok(Plan {
            scenario: "churn",
            population: population(0, self.users, "bench"),
            connect_rate: 0.0,
            settle: Duration::from_secs(1),
            hold: Duration::ZERO,
            fanout: None,
            direct: Some(self.direct.direct()),
            churn: Some((self.churn.churn_rate, self.churn.churn_life_ms)),
            drain: Duration::from_secs(self.direct.drain),
            up: None,
        })
    }
}

impl MixedArgs {
    /// The run's plan.
    pub fn plan(&self) -> Result<Plan> {
        ensure!(
            self.subs > 0 && self.pubs > 0,
            "--subs and --pubs must be positive"
        );
        ensure!(self.users >= 2, "--users must be at least 2");
        positive("--pub-rate", self.pub_rate)?;
        positive("--rate", self.direct.rate)?;
        positive("--churn-rate", self.churn.churn_rate)?;
        Ok(Plan {
            scenario: "mixed",
            population: population(self.subs, self.users, &self.topic),
            connect_rate: 0.0,
            settle: Duration::from_secs(1),
            hold: Duration::ZERO,
            fanout: Some(Fanout {
                pubs: self.pubs,
                pace: Pace::Rate(self.pub_rate),
            }),
            direct: Some(self.direct.direct()),
            churn: Some((self.churn.churn_rate, self.churn.churn_life_ms)),
            drain: Duration::from_secs(self.direct.drain),
            up: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct P2p {
        #[command(flatten)]
        args: P2pArgs,
    }

    fn p2p(args: &[&str]) -> Result<Plan> {
        let parsed = P2p::try_parse_from(std::iter::once("p2p").chain(args.iter().copied()))?;
        parsed.args.plan()
    }

    #[test]
    fn to_topics_subscribes_users_and_needs_the_api() {
        let plan = p2p(&["--users", "4"]).expect("users");
        assert!(!plan.population.user_topics);
        assert_eq!(plan.direct.map(|d| d.to), Some(To::Users));
        let plan = p2p(&["--users", "4", "--to", "topics"]).expect("topics");
        assert!(plan.population.user_topics);
        assert_eq!(plan.direct.map(|d| d.to), Some(To::Topics));
        let refused = p2p(&["--users", "4", "--to", "topics", "--via", "frames"]);
        let error = refused.expect_err("refused").to_string();
        assert!(error.contains("--via api"), "{error}");
        assert!(p2p(&["--users", "4", "--to", "users", "--via", "frames"]).is_ok());
    }
}
