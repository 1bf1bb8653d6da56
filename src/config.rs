//! Typed settings, read once at cold start from the environment.

use std::time::Duration;

use std::collections::BTreeSet;

use crate::limiter::LimiterConfig;
use crate::message::{check_bucket, PackagingGroupId, RoleArn, SourcePolicy};

/// Why the configuration is unusable. Each error names the variable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid configuration: {var}={value:?}: {reason}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub var: &'static str,
    /// Its value as read.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Everything the function can be told through its environment.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `PACKAGING_GROUP_ID`: used when a message leaves `packagingGroupId` out.
    pub packaging_group_id: Option<PackagingGroupId>,
    /// `SOURCE_ROLE_ARN`: used when a message leaves `sourceRoleArn` out.
    pub source_role_arn: Option<RoleArn>,
    /// `MAX_CONCURRENCY`: messages of one batch processed at once (1 to 1000, default 10).
    pub max_concurrency: usize,
    /// `DEADLINE_MARGIN_MS`: the most time kept free before the Lambda deadline to report
    /// unfinished messages (default 2000, at least 200). A short invocation keeps less: a fifth of
    /// its time, and never under 200 ms ([`crate::redelivery::deadline_margin`]).
    pub deadline_margin: Duration,
    /// `API_TIMEOUT_MS`: the most one MediaPackage VOD operation may take (default 10000).
    pub api_timeout: Duration,
    /// `API_ATTEMPT_TIMEOUT_MS`: the most one HTTP attempt may take (default 3000).
    pub api_attempt_timeout: Duration,
    /// `API_MAX_ATTEMPTS`: attempts per MediaPackage VOD call within one invocation, first one
    /// included, each through the rate limiter (1 to 10, default 3). The SDK itself does not
    /// retry: retries happen at this one layer.
    pub api_max_attempts: u32,
    /// `INITIAL_REQUESTS_PER_SECOND`: the limiter's rate before it has learned anything. Unset
    /// (the default), an instance sends a batch's messages at once, up to `MAX_CONCURRENCY`,
    /// until the API first throttles it, and learns its rate from there.
    pub initial_rate: Option<f64>,
    /// `MAX_REQUESTS_PER_SECOND`: a ceiling on the limiter's rate, per instance (default none).
    pub max_rate: Option<f64>,
    /// `INITIAL_WINDOW`: while it has no evidence of a quota, how many calls an instance sends
    /// before the API has answered any (default 10, TCP's initial window). Each accepted answer
    /// lets two more go, as TCP's slow start does: with 5, a batch of ten takes two round trips.
    pub initial_window: u32,
    /// `REQUEST_BURST_MS`: how much of its rate, in time, an instance that has been calling
    /// less than its rate may send at once (default 1000: one second's worth).
    pub burst: Duration,
    /// `PERMIT_WAIT_MS`: the most a message waits for a request slot; a message that would
    /// wait longer goes back to SQS with a delay instead (default 150).
    pub permit_wait: Duration,
    /// `MAX_RECEIVE_COUNT`: the source queue's `maxReceiveCount`, if it has a redrive policy
    /// (default none). A message received that many times is on its last delivery: handed back,
    /// SQS would move it to the dead-letter queue without a reason, so it waits for a request
    /// slot as long as the invocation allows instead of `PERMIT_WAIT_MS`.
    pub max_receive_count: Option<u32>,
    /// `REDELIVERY_BASE_SECONDS`: the first redelivery delay ceiling, doubled with each receive
    /// (full jitter; default 2).
    pub redelivery_base: Duration,
    /// `REDELIVERY_CAP_SECONDS`: the longest redelivery delay (default 900, at most 43200).
    pub redelivery_cap: Duration,
    /// `QUOTA_REDELIVERY_SECONDS`: the delay for a message refused because a resource quota
    /// is exhausted ("Resource limit exceeded"; default 3600, at most 43200).
    pub quota_redelivery: Duration,
    /// `FIFO_REDELIVERY_CAP_SECONDS`: the longest delay for a message of a FIFO queue (default
    /// 10). While it is away SQS delivers nothing behind it in its message group.
    pub fifo_redelivery_cap: Duration,
    /// `ALLOWED_SOURCE_BUCKETS` and `ALLOWED_SOURCE_ROLE_ARNS` (comma-separated): the buckets
    /// and roles a message may name. Without `ALLOWED_SOURCE_ROLE_ARNS`, only `SOURCE_ROLE_ARN`
    /// may be used when it is set; without `ALLOWED_SOURCE_BUCKETS`, any bucket.
    pub policy: SourcePolicy,
    /// `DEAD_LETTER_QUEUE_URL`: where permanent failures go; by default the source queue's
    /// `RedrivePolicy` target.
    pub dead_letter_queue_url: Option<String>,
    /// `QUOTA_MAX_REFUSALS`: how many CreateAsset calls of one packaging group this instance
    /// sees refused for the asset quota before it treats the group as full and sends the
    /// messages refused for it to the dead-letter queue (`AssetQuotaExceeded`; 1 to 1000,
    /// default 3). Earlier refusals come back after `QUOTA_REDELIVERY_SECONDS`.
    pub quota_max_refusals: u32,
    /// `OVERFLOW_PACKAGING_GROUP_IDS` (comma-separated): identically configured packaging
    /// groups that take the assets of `PACKAGING_GROUP_ID`, in order, once it is full.
    pub overflow_groups: Vec<PackagingGroupId>,
    /// `EVENT_BUS_NAME`: the EventBridge bus (name or ARN) that receives an `Asset Created`
    /// event for each asset made or found; unset, no events (the default).
    pub event_bus: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        let limiter = LimiterConfig::default();
        Self {
            packaging_group_id: None,
            source_role_arn: None,
            max_concurrency: 10,
            deadline_margin: Duration::from_millis(2000),
            api_timeout: Duration::from_millis(10_000),
            api_attempt_timeout: Duration::from_millis(3000),
            api_max_attempts: 3,
            initial_rate: None,
            max_rate: limiter.max_rate,
            initial_window: limiter.initial_window,
            burst: limiter.burst,
            permit_wait: Duration::from_millis(150),
            max_receive_count: None,
            redelivery_base: Duration::from_secs(2),
            redelivery_cap: Duration::from_secs(900),
            quota_redelivery: Duration::from_secs(3600),
            fifo_redelivery_cap: Duration::from_secs(10),
            policy: SourcePolicy::default(),
            dead_letter_queue_url: None,
            quota_max_refusals: 3,
            overflow_groups: Vec::new(),
            event_bus: None,
        }
    }
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `lookup`, which returns a variable's value if it is set.
    /// An empty value counts as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let defaults = Self::default();
        let packaging_group_id = get("PACKAGING_GROUP_ID")
            .map(|v| PackagingGroupId::parse(&v).map_err(|e| invalid("PACKAGING_GROUP_ID", &v, e)))
            .transpose()?;
        let source_role_arn = get("SOURCE_ROLE_ARN")
            .map(|v| RoleArn::parse(&v).map_err(|e| invalid("SOURCE_ROLE_ARN", &v, e)))
            .transpose()?;
        let ms = |var: &'static str, default: Duration, min: u64, max: u64| {
            number(&get, var, min, max).map(|v| v.map_or(default, Duration::from_millis))
        };
        let config = Self {
            packaging_group_id,
            source_role_arn,
            max_concurrency: number(&get, "MAX_CONCURRENCY", 1, 1000)?
                .map_or(defaults.max_concurrency, |v| v as usize),
            deadline_margin: ms("DEADLINE_MARGIN_MS", defaults.deadline_margin, 200, 60_000)?,
            api_timeout: ms("API_TIMEOUT_MS", defaults.api_timeout, 100, 900_000)?,
            api_attempt_timeout: ms(
                "API_ATTEMPT_TIMEOUT_MS",
                defaults.api_attempt_timeout,
                100,
                900_000,
            )?,
            api_max_attempts: number(&get, "API_MAX_ATTEMPTS", 1, 10)?
                .map_or(defaults.api_max_attempts, |v| v as u32),
            initial_rate: rate(&get, "INITIAL_REQUESTS_PER_SECOND")?,
            max_rate: rate(&get, "MAX_REQUESTS_PER_SECOND")?,
            initial_window: number(&get, "INITIAL_WINDOW", 1, 1000)?
                .map_or(defaults.initial_window, |v| v as u32),
            burst: ms("REQUEST_BURST_MS", defaults.burst, 0, 60_000)?,
            permit_wait: ms("PERMIT_WAIT_MS", defaults.permit_wait, 0, 900_000)?,
            max_receive_count: number(&get, "MAX_RECEIVE_COUNT", 1, 1000)?.map(|v| v as u32),
            redelivery_base: secs(&get, "REDELIVERY_BASE_SECONDS", defaults.redelivery_base, 1)?,
            redelivery_cap: secs(&get, "REDELIVERY_CAP_SECONDS", defaults.redelivery_cap, 1)?,
            quota_redelivery: secs(
                &get,
                "QUOTA_REDELIVERY_SECONDS",
                defaults.quota_redelivery,
                0,
            )?,
            fifo_redelivery_cap: secs(
                &get,
                "FIFO_REDELIVERY_CAP_SECONDS",
                defaults.fifo_redelivery_cap,
                1,
            )?,
            policy: SourcePolicy::default(),
            dead_letter_queue_url: get("DEAD_LETTER_QUEUE_URL")
                .map(|v| {
                    let v = v.trim().to_string();
                    if v.starts_with("https://") || v.starts_with("http://") {
                        Ok(v)
                    } else {
                        Err(invalid(
                            "DEAD_LETTER_QUEUE_URL",
                            &v,
                            "expected a queue URL (https://sqs.region.amazonaws.com/account/name)",
                        ))
                    }
                })
                .transpose()?,
            quota_max_refusals: number(&get, "QUOTA_MAX_REFUSALS", 1, 1000)?
                .map_or(defaults.quota_max_refusals, |v| v as u32),
            overflow_groups: Vec::new(),
            event_bus: get("EVENT_BUS_NAME").map(|v| v.trim().to_string()),
        };
        let config = Self {
            policy: policy(&get, config.source_role_arn.as_ref())?,
            overflow_groups: overflow(&get, config.packaging_group_id.as_ref())?,
            ..config
        };
        if config.redelivery_base > config.redelivery_cap {
            return Err(invalid(
                "REDELIVERY_BASE_SECONDS",
                &config.redelivery_base.as_secs().to_string(),
                "must not exceed REDELIVERY_CAP_SECONDS",
            ));
        }
        if config.api_attempt_timeout > config.api_timeout {
            return Err(invalid(
                "API_ATTEMPT_TIMEOUT_MS",
                &config.api_attempt_timeout.as_millis().to_string(),
                "must not exceed API_TIMEOUT_MS",
            ));
        }
        Ok(config)
    }

    /// What is allowed but unwise, for a warning at cold start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.policy.buckets.is_none() {
            warnings.push(
                "ALLOWED_SOURCE_BUCKETS is not set: a message may make MediaPackage VOD ingest any \
                 object its source role can read; list the buckets assets may come from"
                    .to_string(),
            );
        }
        warnings
    }
}

fn list(get: &impl Fn(&str) -> Option<String>, var: &str) -> Option<Vec<String>> {
    get(var).map(|v| {
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    })
}

/// `OVERFLOW_PACKAGING_GROUP_IDS`: valid ids, each once, none of them `PACKAGING_GROUP_ID`,
/// which must be set: the overflow groups follow that group.
fn overflow(
    get: &impl Fn(&str) -> Option<String>,
    default: Option<&PackagingGroupId>,
) -> Result<Vec<PackagingGroupId>, ConfigError> {
    const VAR: &str = "OVERFLOW_PACKAGING_GROUP_IDS";
    let Some(ids) = list(get, VAR) else {
        return Ok(Vec::new());
    };
    let Some(default) = default else {
        return Err(invalid(
            VAR,
            &ids.join(","),
            "needs PACKAGING_GROUP_ID: the overflow groups take that group's assets once it is full",
        ));
    };
    let mut groups: Vec<PackagingGroupId> = Vec::new();
    for id in &ids {
        let group = PackagingGroupId::parse(id).map_err(|e| invalid(VAR, id, e))?;
        if &group == default || groups.contains(&group) {
            return Err(invalid(
                VAR,
                &ids.join(","),
                format!("names {id} twice (PACKAGING_GROUP_ID included)"),
            ));
        }
        groups.push(group);
    }
    Ok(groups)
}

fn policy(
    get: &impl Fn(&str) -> Option<String>,
    source_role_arn: Option<&RoleArn>,
) -> Result<SourcePolicy, ConfigError> {
    const BUCKETS: &str = "ALLOWED_SOURCE_BUCKETS";
    const ROLES: &str = "ALLOWED_SOURCE_ROLE_ARNS";
    let buckets = list(get, BUCKETS)
        .map(|names| {
            names
                .into_iter()
                .map(|b| {
                    check_bucket(&b)
                        .map(|()| b.clone())
                        .map_err(|e| invalid(BUCKETS, &b, e))
                })
                .collect::<Result<BTreeSet<_>, _>>()
        })
        .transpose()?;
    let roles = match list(get, ROLES) {
        Some(arns) => {
            let roles = arns
                .iter()
                .map(|a| RoleArn::parse(a).map_err(|e| invalid(ROLES, a, e)))
                .collect::<Result<BTreeSet<_>, _>>()?;
            if let Some(default) = source_role_arn.filter(|r| !roles.contains(*r)) {
                return Err(invalid(
                    ROLES,
                    &arns.join(","),
                    format!("does not include SOURCE_ROLE_ARN ({default})"),
                ));
            }
            Some((roles, ROLES))
        }
        None => source_role_arn.map(|r| {
            (
                BTreeSet::from([r.clone()]),
                "SOURCE_ROLE_ARN (the only role allowed when ALLOWED_SOURCE_ROLE_ARNS is not set)",
            )
        }),
    };
    Ok(SourcePolicy { buckets, roles })
}

fn invalid(var: &'static str, value: &str, reason: impl ToString) -> ConfigError {
    ConfigError {
        var,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

fn secs(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: Duration,
    min: u64,
) -> Result<Duration, ConfigError> {
    number(get, var, min, 43_200).map(|v| v.map_or(default, Duration::from_secs))
}

fn rate(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<Option<f64>, ConfigError> {
    let Some(raw) = get(var) else {
        return Ok(None);
    };
    match raw.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.1..=100_000.0).contains(&v) => Ok(Some(v)),
        _ => Err(invalid(
            var,
            &raw,
            "expected requests per second from 0.1 to 100000",
        )),
    }
}

fn number(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, ConfigError> {
    let Some(raw) = get(var) else {
        return Ok(None);
    };
    match raw.trim().parse::<u64>() {
        Ok(v) if (min..=max).contains(&v) => Ok(Some(v)),
        _ => Err(invalid(
            var,
            &raw,
            format!("expected a whole number from {min} to {max}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn an_empty_environment_gives_the_documented_defaults() {
        assert_eq!(config(&[]).unwrap(), Config::default());
    }

    #[test]
    fn every_variable_is_read() {
        let c = config(&[
            ("PACKAGING_GROUP_ID", "vod-group"),
            (
                "SOURCE_ROLE_ARN",
                "arn:aws:iam::123456789012:role/MediaPackageRead",
            ),
            ("MAX_CONCURRENCY", "4"),
            ("DEADLINE_MARGIN_MS", "500"),
            ("API_TIMEOUT_MS", "5000"),
            ("API_ATTEMPT_TIMEOUT_MS", "1000"),
            ("API_MAX_ATTEMPTS", "2"),
            ("INITIAL_REQUESTS_PER_SECOND", "2.5"),
            ("MAX_REQUESTS_PER_SECOND", "40"),
            ("INITIAL_WINDOW", "4"),
            ("PERMIT_WAIT_MS", "250"),
            ("MAX_RECEIVE_COUNT", "20"),
            ("REQUEST_BURST_MS", "500"),
            ("REDELIVERY_BASE_SECONDS", "3"),
            ("REDELIVERY_CAP_SECONDS", "600"),
            ("QUOTA_REDELIVERY_SECONDS", "7200"),
            ("FIFO_REDELIVERY_CAP_SECONDS", "5"),
            ("QUOTA_MAX_REFUSALS", "5"),
            ("OVERFLOW_PACKAGING_GROUP_IDS", "vod-group-2, vod-group-3"),
            ("EVENT_BUS_NAME", "pipeline"),
        ])
        .unwrap();
        assert_eq!(c.packaging_group_id.unwrap().as_str(), "vod-group");
        assert_eq!(
            c.source_role_arn.unwrap().as_str(),
            "arn:aws:iam::123456789012:role/MediaPackageRead"
        );
        assert_eq!(c.max_concurrency, 4);
        assert_eq!(c.deadline_margin, Duration::from_millis(500));
        assert_eq!(c.api_timeout, Duration::from_millis(5000));
        assert_eq!(c.api_attempt_timeout, Duration::from_millis(1000));
        assert_eq!(c.api_max_attempts, 2);
        assert_eq!(c.initial_rate, Some(2.5));
        assert_eq!(c.max_rate, Some(40.0));
        assert_eq!(c.initial_window, 4);
        assert_eq!(c.permit_wait, Duration::from_millis(250));
        assert_eq!(c.max_receive_count, Some(20));
        assert_eq!(c.burst, Duration::from_millis(500));
        assert_eq!(c.redelivery_base, Duration::from_secs(3));
        assert_eq!(c.redelivery_cap, Duration::from_secs(600));
        assert_eq!(c.quota_redelivery, Duration::from_secs(7200));
        assert_eq!(c.fifo_redelivery_cap, Duration::from_secs(5));
        assert_eq!(c.quota_max_refusals, 5);
        let overflow: Vec<&str> = c.overflow_groups.iter().map(|g| g.as_str()).collect();
        assert_eq!(overflow, ["vod-group-2", "vod-group-3"]);
        assert_eq!(c.event_bus.as_deref(), Some("pipeline"));
    }

    #[test]
    fn overflow_groups_follow_the_default_group_each_once() {
        let bad = |vars: &[(&str, &str)]| config(vars).unwrap_err().var;
        // Without a default group there is nothing for them to follow.
        assert_eq!(
            bad(&[("OVERFLOW_PACKAGING_GROUP_IDS", "g2")]),
            "OVERFLOW_PACKAGING_GROUP_IDS"
        );
        for list in ["g1,g2", "g2,g2", "g2,bad group"] {
            assert_eq!(
                bad(&[
                    ("PACKAGING_GROUP_ID", "g1"),
                    ("OVERFLOW_PACKAGING_GROUP_IDS", list)
                ]),
                "OVERFLOW_PACKAGING_GROUP_IDS",
                "{list}"
            );
        }
        assert_eq!(bad(&[("QUOTA_MAX_REFUSALS", "0")]), "QUOTA_MAX_REFUSALS");
    }

    #[test]
    fn a_margin_too_small_to_report_in_is_refused() {
        assert_eq!(
            config(&[("DEADLINE_MARGIN_MS", "0")]).unwrap_err().var,
            "DEADLINE_MARGIN_MS"
        );
        assert_eq!(
            config(&[("DEADLINE_MARGIN_MS", "200")])
                .unwrap()
                .deadline_margin,
            Duration::from_millis(200)
        );
    }

    #[test]
    fn no_bucket_list_is_warned_about_and_a_list_is_not() {
        let warnings = config(&[]).unwrap().warnings();
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("ALLOWED_SOURCE_BUCKETS"),
            "{warnings:?}"
        );
        let listed = config(&[("ALLOWED_SOURCE_BUCKETS", "media-masters")]).unwrap();
        assert!(listed.warnings().is_empty());
    }

    #[test]
    fn a_bad_number_names_its_variable() {
        let err = config(&[("MAX_CONCURRENCY", "0")]).unwrap_err();
        assert_eq!(err.var, "MAX_CONCURRENCY");
        assert!(err.to_string().contains("MAX_CONCURRENCY=\"0\""), "{err}");
        assert_eq!(
            config(&[("API_MAX_ATTEMPTS", "many")]).unwrap_err().var,
            "API_MAX_ATTEMPTS"
        );
    }

    #[test]
    fn rates_and_delays_outside_their_range_are_refused() {
        assert_eq!(
            config(&[("MAX_REQUESTS_PER_SECOND", "0")]).unwrap_err().var,
            "MAX_REQUESTS_PER_SECOND"
        );
        assert_eq!(
            config(&[("INITIAL_REQUESTS_PER_SECOND", "NaN")])
                .unwrap_err()
                .var,
            "INITIAL_REQUESTS_PER_SECOND"
        );
        assert_eq!(
            config(&[("REDELIVERY_CAP_SECONDS", "50000")])
                .unwrap_err()
                .var,
            "REDELIVERY_CAP_SECONDS"
        );
        assert_eq!(
            config(&[
                ("REDELIVERY_BASE_SECONDS", "30"),
                ("REDELIVERY_CAP_SECONDS", "10")
            ])
            .unwrap_err()
            .var,
            "REDELIVERY_BASE_SECONDS"
        );
    }

    #[test]
    fn a_bad_role_arn_names_its_variable() {
        let err = config(&[("SOURCE_ROLE_ARN", "MediaPackageRead")]).unwrap_err();
        assert_eq!(err.var, "SOURCE_ROLE_ARN");
    }

    #[test]
    fn an_attempt_timeout_longer_than_the_operation_timeout_is_refused() {
        let err = config(&[
            ("API_TIMEOUT_MS", "1000"),
            ("API_ATTEMPT_TIMEOUT_MS", "2000"),
        ])
        .unwrap_err();
        assert_eq!(err.var, "API_ATTEMPT_TIMEOUT_MS");
    }

    const ROLE: &str = "arn:aws:iam::123456789012:role/MediaPackageRead";
    const OTHER: &str = "arn:aws:iam::123456789012:role/Other";

    #[test]
    fn the_allow_lists_are_read_and_checked() {
        let c = config(&[
            ("ALLOWED_SOURCE_BUCKETS", "media-in, media-archive"),
            ("ALLOWED_SOURCE_ROLE_ARNS", &format!("{ROLE},{OTHER}")),
            ("SOURCE_ROLE_ARN", ROLE),
            (
                "DEAD_LETTER_QUEUE_URL",
                "http://127.0.0.1:5000/123456789012/dlq",
            ),
        ])
        .unwrap();
        let buckets = c.policy.buckets.unwrap();
        assert!(buckets.contains("media-in") && buckets.contains("media-archive"));
        assert_eq!(c.policy.roles.unwrap().0.len(), 2);
        assert_eq!(
            c.dead_letter_queue_url.as_deref(),
            Some("http://127.0.0.1:5000/123456789012/dlq")
        );
        let bad = |vars: &[(&str, &str)]| config(vars).unwrap_err().var;
        assert_eq!(
            bad(&[("ALLOWED_SOURCE_BUCKETS", "Bad_Bucket")]),
            "ALLOWED_SOURCE_BUCKETS"
        );
        assert_eq!(
            bad(&[("ALLOWED_SOURCE_ROLE_ARNS", "role")]),
            "ALLOWED_SOURCE_ROLE_ARNS"
        );
        assert_eq!(
            bad(&[
                ("SOURCE_ROLE_ARN", ROLE),
                ("ALLOWED_SOURCE_ROLE_ARNS", OTHER)
            ]),
            "ALLOWED_SOURCE_ROLE_ARNS"
        );
        assert_eq!(
            bad(&[("DEAD_LETTER_QUEUE_URL", "dlq")]),
            "DEAD_LETTER_QUEUE_URL"
        );
    }

    #[test]
    fn by_default_only_the_configured_role_may_be_used() {
        let c = config(&[("SOURCE_ROLE_ARN", ROLE)]).unwrap();
        let (roles, by) = c.policy.roles.unwrap();
        assert_eq!(roles.len(), 1);
        assert!(by.starts_with("SOURCE_ROLE_ARN"));
        assert_eq!(config(&[]).unwrap().policy, SourcePolicy::default());
    }
}
