//! The SAM template against the code: its alarms watch metrics the function really writes,
//! under the namespace and `Service` dimension it writes them with.

use serde_norway::Value;

use mpvod_ingest::metrics::COUNTERS;

fn template() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/template.yaml")).unwrap();
    serde_norway::from_str(&text).unwrap()
}

fn is_ref(value: &Value, name: &str) -> bool {
    matches!(value, Value::Tagged(t) if t.tag == "!Ref" && t.value.as_str() == Some(name))
}

#[test]
fn the_alarms_on_the_functions_metrics_name_metrics_it_writes() {
    let template = template();
    let variables =
        &template["Resources"]["IngestFunction"]["Properties"]["Environment"]["Variables"];
    assert!(is_ref(&variables["METRICS_NAMESPACE"], "MetricsNamespace"));
    assert!(is_ref(&variables["METRICS_SERVICE_NAME"], "AWS::StackName"));
    let names: Vec<&str> = COUNTERS.iter().map(|(name, _)| *name).collect();
    let mut watched = Vec::new();
    for (_, resource) in template["Resources"].as_mapping().unwrap() {
        if resource["Type"].as_str() != Some("AWS::CloudWatch::Alarm") {
            continue;
        }
        let properties = &resource["Properties"];
        if !is_ref(&properties["Namespace"], "MetricsNamespace") {
            continue;
        }
        let metric = properties["MetricName"].as_str().unwrap();
        assert!(names.contains(&metric), "no metric {metric} is written");
        let dimension = &properties["Dimensions"][0];
        assert_eq!(dimension["Name"].as_str(), Some("Service"));
        assert!(is_ref(&dimension["Value"], "AWS::StackName"));
        watched.push(metric.to_string());
    }
    watched.sort();
    assert_eq!(watched, ["QuotaRefusals", "ThrottledCalls"]);
}
