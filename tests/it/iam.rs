//! The SAM template's IAM policy allows every AWS call the function's code makes.
//!
//! The emulator and moto check no permissions, so this test does: it finds the SDK operations
//! called in `src/`, maps each to the IAM actions it needs and the resource type each action
//! is authorized on, and checks that an `Allow` statement of the function's policy covers it.
//! Actions and resource types are taken from the Service Authorization Reference:
//!
//! - <https://docs.aws.amazon.com/service-authorization/latest/reference/list_awselementalmediapackagevod.html>
//!   (CreateAsset: no resource type, so `"*"`, condition keys `aws:RequestTag/${TagKey}` and
//!   `aws:TagKeys`, dependent action `mediapackage-vod:TagResource` and `iam:PassRole`;
//!   DescribeAsset and TagResource: `assets`)
//! - <https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazonsqs.html>
//!   (ChangeMessageVisibility, which also authorizes ChangeMessageVisibilityBatch,
//!   GetQueueAttributes, GetQueueUrl, SendMessage: `queue`)
//! - <https://docs.aws.amazon.com/service-authorization/latest/reference/list_awsidentityandaccessmanagementiam.html>
//!   (PassRole: `role`)
//! - <https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazoneventbridge.html>
//!   (PutEvents: `event-bus`)

use std::path::PathBuf;

use serde_norway::Value;

/// A resource an action must be allowed on.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Needs {
    /// The action has no resource type: only `"*"` allows it.
    Star,
    /// An ARN of the action's resource type, as the function would touch it.
    Arn(&'static str),
    /// A resource of the template (`!GetAtt NAME.Arn`) or a parameter (`!Ref NAME`).
    Template(&'static str),
    /// The source role: the `SourceRoleArn` parameter, or the `SourceRole` the stack creates
    /// when that is empty (`!If [CreateSourceRole, !GetAtt SourceRole.Arn, !Ref SourceRoleArn]`).
    SourceRole,
}

const ASSET: Needs =
    Needs::Arn("arn:aws:mediapackage-vod:us-east-1:123456789012:assets/show-s01e01");

/// Each SDK operation the code calls: the actions it needs, each with its resource.
const OPERATIONS: &[(&str, &[(&str, Needs)])] = &[
    (
        "create_asset",
        &[
            ("mediapackage-vod:CreateAsset", Needs::Star),
            ("mediapackage-vod:TagResource", ASSET),
            ("iam:PassRole", Needs::SourceRole),
        ],
    ),
    (
        "describe_asset",
        &[("mediapackage-vod:DescribeAsset", ASSET)],
    ),
    (
        "get_queue_url",
        &[
            ("sqs:GetQueueUrl", Needs::Template("IngestQueue")),
            ("sqs:GetQueueUrl", Needs::Template("DeadLetterQueue")),
        ],
    ),
    (
        "get_queue_attributes",
        &[("sqs:GetQueueAttributes", Needs::Template("IngestQueue"))],
    ),
    (
        "change_message_visibility_batch",
        &[(
            "sqs:ChangeMessageVisibility",
            Needs::Template("IngestQueue"),
        )],
    ),
    (
        "send_message",
        &[("sqs:SendMessage", Needs::Template("DeadLetterQueue"))],
    ),
    (
        "put_events",
        &[(
            "events:PutEvents",
            Needs::Arn("arn:aws:events:us-east-1:123456789012:event-bus/pipeline"),
        )],
    ),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Rust files under `dir`, in its subdirectories too.
fn rust_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The SDK operations called in `src/`: every `.client` followed by `.operation()`.
fn operations_in_code() -> Vec<String> {
    let mut found = Vec::new();
    for path in rust_files(&root().join("src")) {
        let text = std::fs::read_to_string(path).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find(".client") {
            rest = &rest[at + ".client".len()..];
            let after = rest.trim_start();
            let Some(call) = after.strip_prefix('.') else {
                continue;
            };
            let name: String = call
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if call[name.len()..].starts_with("()") && !found.contains(&name) {
                found.push(name);
            }
        }
    }
    found.sort();
    found
}

/// `*` matches any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            text.starts_with(head)
                && (0..=text.len() - head.len()).any(|i| glob(tail, &text[head.len() + i..]))
        }
    }
}

fn strings(value: &Value) -> Vec<Value> {
    match value {
        Value::Sequence(items) => items.clone(),
        other => vec![other.clone()],
    }
}

/// Whether a statement's `Resource` entry covers what is needed.
fn covers(resource: &Value, needs: Needs) -> bool {
    match (resource, needs) {
        (Value::String(s), Needs::Star) => s == "*",
        (Value::String(s), Needs::Arn(arn)) => glob(s, arn),
        (Value::Tagged(tagged), Needs::Arn(arn)) if tagged.tag == "!Sub" => {
            let text = tagged.value.as_str().unwrap_or_default();
            let text = text
                .replace("${AWS::Partition}", "aws")
                .replace("${AWS::Region}", "us-east-1")
                .replace("${AWS::AccountId}", "123456789012")
                .replace("${EventBusName}", "pipeline");
            glob(&text, arn)
        }
        (Value::Tagged(tagged), Needs::Template(name)) if tagged.tag == "!GetAtt" => {
            tagged.value.as_str() == Some(&format!("{name}.Arn"))
        }
        (Value::Tagged(tagged), Needs::Template(name)) if tagged.tag == "!Ref" => {
            tagged.value.as_str() == Some(name)
        }
        // Whichever way the condition goes, the resource is the source role.
        (Value::Tagged(tagged), Needs::SourceRole) if tagged.tag == "!If" => tagged
            .value
            .as_sequence()
            .is_some_and(|v| v.len() == 3 && v[1..].iter().all(|b| covers(b, Needs::SourceRole))),
        (resource, Needs::SourceRole) => {
            covers(resource, Needs::Template("SourceRoleArn"))
                || covers(resource, Needs::Template("SourceRole"))
        }
        _ => false,
    }
}

/// A statement behind a condition (`!If [condition, statement, !Ref AWS::NoValue]`) is the
/// statement in force when the condition holds.
fn when_in_force(statement: &Value) -> Value {
    match statement {
        Value::Tagged(tagged) if tagged.tag == "!If" => tagged.value[1].clone(),
        other => other.clone(),
    }
}

/// The function's policy statements.
fn statements() -> Vec<Value> {
    let text = std::fs::read_to_string(root().join("template.yaml")).unwrap();
    let template: Value = serde_norway::from_str(&text).unwrap();
    let policies = &template["Resources"]["IngestFunction"]["Properties"]["Policies"];
    strings(policies)
        .iter()
        .flat_map(|policy| strings(&policy["Statement"]))
        .map(|statement| when_in_force(&statement))
        .collect()
}

fn allowed(statements: &[Value], action: &str, needs: Needs) -> bool {
    statements.iter().any(|statement| {
        statement["Effect"].as_str() == Some("Allow")
            && strings(&statement["Action"])
                .iter()
                .any(|a| a.as_str() == Some(action))
            && strings(&statement["Resource"])
                .iter()
                .any(|r| covers(r, needs))
    })
}

#[test]
fn every_sdk_call_in_the_code_has_an_entry_in_the_table() {
    let found = operations_in_code();
    let known: Vec<&str> = OPERATIONS.iter().map(|(op, _)| *op).collect();
    for op in &found {
        assert!(
            known.contains(&op.as_str()),
            "src/ calls {op}: add the IAM actions it needs to OPERATIONS"
        );
    }
    // The scan does find the calls.
    assert!(found.iter().any(|op| op == "create_asset"), "{found:?}");
    assert!(found.iter().any(|op| op == "send_message"), "{found:?}");
}

#[test]
fn the_template_allows_every_action_the_code_needs_on_its_resource_type() {
    let statements = statements();
    assert!(!statements.is_empty());
    for op in operations_in_code() {
        let (_, needs) = OPERATIONS.iter().find(|(o, _)| *o == op).unwrap();
        for (action, resource) in needs.iter() {
            assert!(
                allowed(&statements, action, *resource),
                "template.yaml does not allow {action} on {resource:?} (needed by {op})"
            );
        }
    }
}

#[test]
fn an_action_without_a_resource_type_scoped_to_arns_is_not_allowed() {
    // The old policy: CreateAsset on assets/* and packaging-groups/*, which IAM refuses.
    let scoped: Vec<Value> = serde_norway::from_str(
        r#"
- Effect: Allow
  Action: [mediapackage-vod:CreateAsset, mediapackage-vod:DescribeAsset]
  Resource:
    - !Sub "arn:${AWS::Partition}:mediapackage-vod:${AWS::Region}:${AWS::AccountId}:assets/*"
    - !Sub "arn:${AWS::Partition}:mediapackage-vod:${AWS::Region}:${AWS::AccountId}:packaging-groups/*"
"#,
    )
    .unwrap();
    assert!(!allowed(
        &scoped,
        "mediapackage-vod:CreateAsset",
        Needs::Star
    ));
    assert!(allowed(&scoped, "mediapackage-vod:DescribeAsset", ASSET));
}
