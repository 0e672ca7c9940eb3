"""The CloudFormation stack's properties that matter (cfn-lint and checkov run in
`make lint-deploy`; these pin the decisions)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

TEMPLATE = Path(__file__).resolve().parents[3] / "deploy/aws/termtune.yaml"
SERVICES = ("api", "dataprep", "trainer", "evaluator", "publisher")
DATA_ACTIONS = (
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "sqs:SendMessage",
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "bedrock:InvokeModel",
    "secretsmanager:GetSecretValue",
)


@pytest.fixture(scope="module")
def resources():
    return yaml.safe_load(TEMPLATE.read_text())["Resources"]


def _of_type(resources, kind):
    return {name: r for name, r in resources.items() if r["Type"] == kind}


def _statements(resource):
    props = resource["Properties"]
    docs = [p["PolicyDocument"] for p in props.get("Policies", [])]
    if "PolicyDocument" in props:
        docs.append(props["PolicyDocument"])
    return [s for doc in docs for s in doc["Statement"]]


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _container(resources, service):
    task = resources[f"{service.capitalize()}Task"]["Properties"]
    return task, task["ContainerDefinitions"][0]


def test_trainer_reserves_gpus_on_the_g5_capacity_provider(resources):
    task, container = _container(resources, "trainer")
    assert task["RequiresCompatibilities"] == ["EC2"]
    assert container["ResourceRequirements"] == [
        {"Type": "GPU", "Value": {"Ref": "GpusPerTrainer"}}
    ]
    assert container["StopTimeout"] >= 30  # SIGTERM checkpoint needs up to 25 s
    template = yaml.safe_load(TEMPLATE.read_text())
    assert all(
        t.startswith("g5.") for t in template["Parameters"]["GpuInstanceType"]["AllowedValues"]
    )
    assert "ecs/optimized-ami" in template["Parameters"]["EcsGpuAmiId"]["Default"]
    assert "/gpu/" in template["Parameters"]["EcsGpuAmiId"]["Default"]
    service = resources["TrainerService"]["Properties"]
    assert service["CapacityProviderStrategy"][0]["CapacityProvider"] == {
        "Ref": "GpuCapacityProvider"
    }
    provider = resources["GpuCapacityProvider"]["Properties"]["AutoScalingGroupProvider"]
    assert provider["ManagedScaling"]["Status"] == "ENABLED"
    assert resources["GpuAutoScalingGroup"]["Properties"]["MinSize"] == "0"


def test_trainers_scale_on_queue_depth_down_to_zero(resources):
    target = resources["TrainerScalableTarget"]["Properties"]
    assert target["MinCapacity"] == 0
    policy = resources["TrainerQueueDepthScaling"]["Properties"]
    metrics = policy["TargetTrackingScalingPolicyConfiguration"]["CustomizedMetricSpecification"]
    queue_metrics = {
        m["MetricStat"]["Metric"]["MetricName"]
        for m in metrics["Metrics"]
        if "MetricStat" in m and m["MetricStat"]["Metric"]["Namespace"] == "AWS/SQS"
    }
    assert queue_metrics == {
        "ApproximateNumberOfMessagesVisible",
        "ApproximateNumberOfMessagesNotVisible",
    }
    for m in metrics["Metrics"]:
        for dim in m.get("MetricStat", {}).get("Metric", {}).get("Dimensions", []):
            if dim["Name"] == "QueueName":
                assert dim["Value"] == {"Fn::GetAtt": ["TrainerQueue", "QueueName"]}


def test_every_queue_has_a_dead_letter_queue(resources):
    queues = _of_type(resources, "AWS::SQS::Queue")
    for service in ("Dataprep", "Trainer", "Evaluator", "Publisher"):
        redrive = queues[f"{service}Queue"]["Properties"]["RedrivePolicy"]
        assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": [f"{service}DeadLetter", "Arn"]}
        assert 1 <= redrive["maxReceiveCount"] <= 5
    assert all("KmsMasterKeyId" in q["Properties"] for q in queues.values())


def test_buckets_are_private_encrypted_and_versioned(resources):
    for name, bucket in _of_type(resources, "AWS::S3::Bucket").items():
        props = bucket["Properties"]
        assert all(props["PublicAccessBlockConfiguration"].values()), name
        assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"], name
        assert props["VersioningConfiguration"] == {"Status": "Enabled"}, name
    for name, policy in _of_type(resources, "AWS::S3::BucketPolicy").items():
        for statement in _statements(policy):
            if statement["Principal"] == "*":
                assert statement["Effect"] == "Deny", name


def test_roles_are_least_privilege(resources):
    roles = _of_type(resources, "AWS::IAM::Role")
    task_roles = {
        resources[f"{s.capitalize()}Task"]["Properties"]["TaskRoleArn"]["Fn::GetAtt"][0]
        for s in SERVICES
    }
    assert len(task_roles) == len(SERVICES)  # one role per service
    for name, role in roles.items():
        for statement in _statements(role):
            if statement["Effect"] != "Allow":
                continue
            actions = _as_list(statement["Action"])
            assert "*" not in actions and not any(a.endswith(":*") for a in actions), name
            if any(a in DATA_ACTIONS for a in actions):
                assert "*" not in _as_list(statement["Resource"]), (name, actions)
    # Only the publisher may pass the import role, and only to Bedrock.
    passers = [
        (name, s)
        for name, role in roles.items()
        for s in _statements(role)
        if "iam:PassRole" in _as_list(s["Action"])
    ]
    assert [n for n, _ in passers] == ["PublisherTaskRole"]
    assert passers[0][1]["Condition"] == {
        "StringEquals": {"iam:PassedToService": "bedrock.amazonaws.com"}
    }


def test_bedrock_import_role_trusts_only_this_accounts_import_jobs(resources):
    trust = resources["BedrockImportRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust[0]["Principal"] == {"Service": "bedrock.amazonaws.com"}
    assert trust[0]["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    assert "model-import-job/*" in trust[0]["Condition"]["ArnEquals"]["aws:SourceArn"]["Fn::Sub"]


@pytest.mark.parametrize("service", SERVICES)
def test_containers_log_to_cloudwatch_and_read_secrets_from_secrets_manager(resources, service):
    _, container = _container(resources, service)
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"
    names = {e["Name"] for e in container["Environment"]}
    assert "TERMTUNE_API_KEY" not in names and not any("SECRET" in n for n in names)
    assert {"TERMTUNE_BROKER_URL", "TERMTUNE_STORE_URL"} <= names
    if service == "api":
        assert container["Secrets"] == [
            {"Name": "TERMTUNE_API_KEY", "ValueFrom": {"Ref": "ApiKeySecret"}}
        ]
