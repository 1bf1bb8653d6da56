//! The emulator's command-line options, shared by `mpvod-emulator` and the local stack
//! (`make up`, through `EMULATOR_ARGS`).

use std::net::SocketAddr;
use std::time::Duration;

use crate::EmulatorConfig;

/// The options, for `--help`.
pub const USAGE: &str = "\
usage: mpvod-emulator [options]

  --port N               port on 127.0.0.1 (default 0: chosen by the OS)
  --rate R               throttle beyond R requests per second (default: no limit)
  --burst B              token bucket size for --rate (default: R rounded up)
  --fault-rate F         answer this share of calls with 500/503 (0.0 to 1.0, default 0)
  --drop-rate F          close the connection without an answer after this share of calls
                         took effect (0.0 to 1.0, default 0)
  --latency-ms MS        add this latency to every call (default 0)
  --asset-quota N        assets per packaging group before 429 Resource limit exceeded
  --packaging-group ID   create this packaging group at start (repeatable)
  --forbidden-role ARN   answer 403 to CreateAsset passing this role (repeatable)
  --seed N               seed for fault injection
  --max-lifetime SECS    exit by itself after this many seconds";

/// The emulator's settings and its lifetime from command-line options; `Err` holds what is
/// wrong (empty for `--help`).
pub fn parse_args(args: &[String]) -> Result<(EmulatorConfig, Option<Duration>), String> {
    let mut config = EmulatorConfig::default();
    let mut port: u16 = 0;
    let mut rate: Option<f64> = None;
    let mut burst: Option<u32> = None;
    let mut lifetime = None;
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = iter.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |what: &str| format!("{flag}: {value:?} is not {what}");
        match flag.as_str() {
            "--port" => port = value.parse().map_err(|_| bad("a port number"))?,
            "--rate" => {
                let r: f64 = value.parse().map_err(|_| bad("a number"))?;
                if r <= 0.0 || !r.is_finite() {
                    return Err(bad("a positive number"));
                }
                rate = Some(r);
            }
            "--burst" => burst = Some(value.parse().map_err(|_| bad("a whole number"))?),
            "--fault-rate" => {
                let f: f64 = value.parse().map_err(|_| bad("a number"))?;
                if !(0.0..=1.0).contains(&f) {
                    return Err(bad("between 0 and 1"));
                }
                config.fault_rate = f;
            }
            "--drop-rate" => {
                let f: f64 = value.parse().map_err(|_| bad("a number"))?;
                if !(0.0..=1.0).contains(&f) {
                    return Err(bad("between 0 and 1"));
                }
                config.drop_rate = f;
            }
            "--latency-ms" => {
                config.latency =
                    Duration::from_millis(value.parse().map_err(|_| bad("a whole number"))?)
            }
            "--asset-quota" => {
                config.asset_quota = Some(value.parse().map_err(|_| bad("a whole number"))?)
            }
            "--packaging-group" => config.packaging_groups.push(value.clone()),
            "--forbidden-role" => config.forbidden_roles.push(value.clone()),
            "--seed" => config.seed = Some(value.parse().map_err(|_| bad("a whole number"))?),
            "--max-lifetime" => {
                lifetime = Some(Duration::from_secs(
                    value.parse().map_err(|_| bad("a whole number"))?,
                ))
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if let Some(rate) = rate {
        config.rate_limit = Some((rate, burst.unwrap_or(rate.ceil() as u32)));
    } else if burst.is_some() {
        return Err("--burst needs --rate".into());
    }
    config.addr = Some(SocketAddr::from(([127, 0, 0, 1], port)));
    Ok((config, lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn rate_without_burst_uses_the_rate_as_burst() {
        let (config, _) = parse_args(&args("--rate 2.5 --packaging-group g")).unwrap();
        assert_eq!(config.rate_limit, Some((2.5, 3)));
        assert_eq!(config.packaging_groups, vec!["g".to_string()]);
    }

    #[test]
    fn bad_values_are_named() {
        let err = parse_args(&args("--fault-rate 2")).unwrap_err();
        assert!(err.contains("--fault-rate"), "{err}");
        assert!(parse_args(&args("--burst 3")).is_err());
        assert!(parse_args(&args("--nope 1"))
            .unwrap_err()
            .contains("--nope"));
    }
}
