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


def _secrets(container):
    """The container's secrets, those of every branch of a condition included."""
    value = container.get("Secrets", [])
    if isinstance(value, dict) and "Fn::If" in value:
        return [s for branch in value["Fn::If"][1:] if isinstance(branch, list) for s in branch]
    return value


def _container(resources, service):
    task = resources[f"{service.capitalize()}Task"]["Properties"]
    return task, task["ContainerDefinitions"][0]


def test_trainer_reserves_gpus_on_the_gpu_capacity_provider(resources):
    task, container = _container(resources, "trainer")
    assert task["RequiresCompatibilities"] == ["EC2"]
    assert container["ResourceRequirements"] == [
        {"Type": "GPU", "Value": {"Ref": "GpusPerTrainer"}}
    ]
    assert container["StopTimeout"] == 120  # ECS's longest; the SIGTERM checkpoint takes 25 s
    template = yaml.safe_load(TEMPLATE.read_text())
    assert "ecs/optimized-ami" in template["Parameters"]["EcsGpuAmiId"]["Default"]
    assert "/gpu/" in template["Parameters"]["EcsGpuAmiId"]["Default"]
    service = resources["TrainerService"]["Properties"]
    assert service["CapacityProviderStrategy"][0]["CapacityProvider"] == {
        "Ref": "GpuCapacityProvider"
    }
    provider = resources["GpuCapacityProvider"]["Properties"]["AutoScalingGroupProvider"]
    assert provider["ManagedScaling"]["Status"] == "ENABLED"
    assert resources["GpuAutoScalingGroup"]["Properties"]["MinSize"] == "0"


def test_gpu_instances_are_g5_g6_or_g6e_in_every_size():
    parameter = yaml.safe_load(TEMPLATE.read_text())["Parameters"]["GpuInstanceType"]
    allowed = parameter["AllowedValues"]
    sizes = ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge")
    assert {t.split(".")[0] for t in allowed} == {"g5", "g6", "g6e"}
    for family in ("g5", "g6", "g6e"):
        assert {f"{family}.{size}" for size in (*sizes, "48xlarge")} <= set(allowed), family
    assert parameter["Default"] in allowed


def test_trainers_can_run_on_spot_and_drain_on_interruption(resources):
    template = yaml.safe_load(TEMPLATE.read_text())
    option = template["Parameters"]["GpuPurchaseOption"]
    assert set(option["AllowedValues"]) == {"OnDemand", "Spot"}
    assert option["Default"] == "OnDemand"
    assert template["Conditions"]["UseSpot"] == {
        "Fn::Equals": [{"Ref": "GpuPurchaseOption"}, "Spot"]
    }
    group = resources["GpuAutoScalingGroup"]["Properties"]
    assert "LaunchTemplate" not in group  # the mixed-instances policy names it
    policy = group["MixedInstancesPolicy"]
    spec = policy["LaunchTemplate"]["LaunchTemplateSpecification"]
    assert spec["LaunchTemplateId"] == {"Ref": "GpuLaunchTemplate"}
    assert policy["LaunchTemplate"]["Overrides"] == [{"InstanceType": {"Ref": "GpuInstanceType"}}]
    distribution = policy["InstancesDistribution"]
    assert distribution["OnDemandBaseCapacity"] == 0
    assert distribution["OnDemandPercentageAboveBaseCapacity"] == {"Fn::If": ["UseSpot", 0, 100]}
    # A reclaimed Spot instance drains: its trainer gets SIGTERM and its stopTimeout.
    template_data = resources["GpuLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    user_data = template_data["UserData"]["Fn::Base64"]["Fn::Sub"]
    assert 'echo "ECS_ENABLE_SPOT_INSTANCE_DRAINING=true" >> /etc/ecs/ecs.config' in user_data
    assert 'echo "ECS_CONTAINER_STOP_TIMEOUT=120s" >> /etc/ecs/ecs.config' in user_data


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
    buckets = _of_type(resources, "AWS::S3::Bucket")
    assert buckets, "the template has no bucket"
    for name, bucket in buckets.items():
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


def test_every_role_that_writes_the_store_may_abort_its_multipart_uploads(resources):
    """boto3's transfers upload large files in parts and abort a failed upload; without
    s3:AbortMultipartUpload (which s3:PutObject does not grant) the parts stay, and are
    billed, until the bucket's lifecycle rule removes them."""
    writers = {
        name: statement
        for name, role in _of_type(resources, "AWS::IAM::Role").items()
        for statement in _statements(role)
        if statement["Effect"] == "Allow" and "s3:PutObject" in _as_list(statement["Action"])
    }
    assert set(writers) == {f"{s.capitalize()}TaskRole" for s in SERVICES}
    for name, statement in writers.items():
        assert "s3:AbortMultipartUpload" in _as_list(statement["Action"]), name


def test_bedrock_import_role_trusts_only_this_accounts_import_jobs(resources):
    trust = resources["BedrockImportRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust[0]["Principal"] == {"Service": "bedrock.amazonaws.com"}
    assert trust[0]["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    assert "model-import-job/*" in trust[0]["Condition"]["ArnEquals"]["aws:SourceArn"]["Fn::Sub"]


@pytest.mark.parametrize("service", SERVICES)
def test_containers_log_to_cloudwatch_and_read_secrets_from_secrets_manager(resources, service):
    _, container = _container(resources, service)
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert "TERMTUNE_API_KEY" not in env and "TERMTUNE_DATABASE_PASSWORD" not in env
    # A *_SECRET variable names a secret (its ARN), never holds one.
    for name in (n for n in env if "SECRET" in n):
        assert name.endswith("_SECRET") and "Fn::GetAtt" in env[name], name
    assert {"TERMTUNE_BROKER_URL", "TERMTUNE_STORE_URL", "TERMTUNE_DATABASE_URL"} <= env.keys()
    api_key = {"Name": "TERMTUNE_API_KEY", "ValueFrom": {"Ref": "ApiKeySecret"}}
    assert (api_key in _secrets(container)) == (service == "api")


def test_database_is_private_encrypted_and_kept(resources):
    template = yaml.safe_load(TEMPLATE.read_text())
    database = resources["Database"]
    props = database["Properties"]
    assert props["Engine"] == "postgres" and str(props["EngineVersion"]).startswith("17")
    assert props["StorageEncrypted"] is True and "KmsKeyId" in props
    assert props["PubliclyAccessible"] is False
    assert props["ManageMasterUserPassword"] is True and "MasterUserPassword" not in props
    assert props["DeletionProtection"] is True
    assert database["DeletionPolicy"] == database["UpdateReplacePolicy"] == "Snapshot"
    retention = template["Parameters"][props["BackupRetentionPeriod"]["Ref"]]
    assert retention["Default"] >= 7 and retention["MinValue"] >= 1
    assert template["Parameters"][props["DBInstanceClass"]["Ref"]]["Default"] == "db.t4g.micro"
    subnets = resources[props["DBSubnetGroupName"]["Ref"]]
    assert subnets["Type"] == "AWS::RDS::DBSubnetGroup"
    assert subnets["Properties"]["SubnetIds"] == {"Ref": "PrivateSubnetIds"}
    assert "DatabaseEndpoint" in template["Outputs"]


def test_database_admits_only_the_tasks_on_5432(resources):
    groups = resources["Database"]["Properties"]["VPCSecurityGroups"]
    assert groups == [{"Ref": "DatabaseSecurityGroup"}]
    ingress = resources["DatabaseSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    for rule in ingress:
        assert (rule["FromPort"], rule["ToPort"], rule["IpProtocol"]) == (5432, 5432, "tcp")
        assert rule["SourceSecurityGroupId"] == {"Ref": "TaskSecurityGroup"}
        assert not {"CidrIp", "CidrIpv6", "SourcePrefixListId"} & rule.keys()
    extra = _of_type(resources, "AWS::EC2::SecurityGroupIngress").values()
    assert not [r for r in extra if r["Properties"]["GroupId"] == {"Ref": "DatabaseSecurityGroup"}]
    # The tasks' security group lets them out to the database (it allows only 443 otherwise).
    egress = [
        r["Properties"]
        for r in _of_type(resources, "AWS::EC2::SecurityGroupEgress").values()
        if r["Properties"]["GroupId"] == {"Ref": "TaskSecurityGroup"}
    ]
    assert any(
        e["DestinationSecurityGroupId"] == {"Ref": "DatabaseSecurityGroup"}
        and e["FromPort"] <= 5432 <= e["ToPort"]
        for e in egress
    )


@pytest.mark.parametrize("service", SERVICES)
def test_every_task_gets_the_database_url_and_reads_its_password_when_connecting(
    resources, service
):
    """The password RDS rotates is read by the task (at each new connection), not injected
    at its start: an injected one is refused by every connection after the first rotation."""
    task, container = _container(resources, service)
    db = resources["Database"]["Properties"]
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["TERMTUNE_DATABASE_URL"] == {
        "Fn::Sub": f"postgresql+psycopg://{db['MasterUsername']}"
        "@${Database.Endpoint.Address}:${Database.Endpoint.Port}/" + db["DBName"]
    }
    secret = {"Fn::GetAtt": ["Database", "MasterUserSecret.SecretArn"]}
    assert env["TERMTUNE_DATABASE_PASSWORD_SECRET"] == secret
    assert not [s for s in _secrets(container) if "DATABASE" in s["Name"]]
    # The task role may read that secret and decrypt it through Secrets Manager only ...
    role = task["TaskRoleArn"]["Fn::GetAtt"][0]
    policies = [
        p
        for p in _of_type(resources, "AWS::IAM::ManagedPolicy").values()
        if {"Ref": role} in p["Properties"]["Roles"]
    ]
    statements = [s for p in policies for s in p["Properties"]["PolicyDocument"]["Statement"]]
    reads = [s for s in statements if "secretsmanager:GetSecretValue" in _as_list(s["Action"])]
    assert [r for s in reads for r in _as_list(s["Resource"])] == [secret]
    decrypt = [s for s in statements if "kms:Decrypt" in _as_list(s["Action"])]
    assert decrypt and all("kms:ViaService" in s["Condition"]["StringEquals"] for s in decrypt)
    # ... and no other secret; the execution role no longer reads the database's.
    assert not any(
        a.startswith("secretsmanager:")
        for s in _statements(resources[role])
        for a in _as_list(s["Action"])
    )
    execution = resources[task["ExecutionRoleArn"]["Fn::GetAtt"][0]]
    readable = [
        r
        for s in _statements(execution)
        if "secretsmanager:GetSecretValue" in _as_list(s["Action"])
        for r in _as_list(s["Resource"])
    ]
    assert secret not in readable


def test_load_balancer_reaches_the_tasks_by_security_group_not_address(resources):
    """Issue 20: a 10.0.0.0/8 egress never reached tasks in the default VPC (172.31/16)."""
    balancer = resources["LoadBalancerSecurityGroup"]["Properties"]
    for rule in balancer["SecurityGroupEgress"]:
        assert rule["DestinationSecurityGroupId"] == {"Ref": "TaskSecurityGroup"}
        assert (rule["FromPort"], rule["ToPort"]) == (8000, 8000)
        assert not {"CidrIp", "CidrIpv6", "DestinationPrefixListId"} & rule.keys()
    ingress = [
        r["Properties"]
        for r in _of_type(resources, "AWS::EC2::SecurityGroupIngress").values()
        if r["Properties"]["GroupId"] == {"Ref": "TaskSecurityGroup"}
    ]
    assert [(r["FromPort"], r["SourceSecurityGroupId"]) for r in ingress] == [
        (8000, {"Ref": "LoadBalancerSecurityGroup"})
    ]
    assert not any("CidrIp" in r for r in ingress)


@pytest.mark.parametrize("service", SERVICES)
def test_every_task_uses_the_stacks_region_for_bedrock(resources, service):
    """Without it the API's invoke, list and delete went to us-east-1 whatever the stack's."""
    _, container = _container(resources, service)
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["TERMTUNE_BEDROCK_REGION"] == {"Ref": "AWS::Region"}
    assert env["AWS_DEFAULT_REGION"] == {"Ref": "AWS::Region"}


@pytest.mark.parametrize("service", SERVICES)
def test_every_container_has_a_health_check(resources, service):
    _, container = _container(resources, service)
    check = container["HealthCheck"]
    if service == "api":
        assert check["Command"][:3] == ["CMD", "python", "-c"]
        assert "urllib.request.urlopen('http://127.0.0.1:8000/healthz'" in check["Command"][3]
    else:  # the heartbeat check: no torch imported, an answer well inside the timeout
        assert check["Command"] == ["CMD", "python", "-m", f"services.{service}", "--health"]
    assert (check["Interval"], check["Timeout"], check["Retries"]) == (15, 5, 3)
    assert check["StartPeriod"] == (120 if service == "trainer" else 60)
    assert check["StartPeriod"] <= 300  # ECS's limit


def _dead_letter_queues(resources):
    queues = _of_type(resources, "AWS::SQS::Queue")
    targets = {
        q["Properties"]["RedrivePolicy"]["deadLetterTargetArn"]["Fn::GetAtt"][0]
        for q in queues.values()
        if "RedrivePolicy" in q["Properties"]
    }
    return targets | {"DeadQueue"}


def _alarms_on(resources, metric):
    return {
        a["Properties"]["Dimensions"][0]["Value"]["Fn::GetAtt"][0]: a["Properties"]
        for a in _of_type(resources, "AWS::CloudWatch::Alarm").values()
        if a["Properties"]["MetricName"] == metric
    }


def test_every_dead_letter_queue_raises_an_alarm(resources):
    alarms = _alarms_on(resources, "ApproximateNumberOfMessagesVisible")
    dead = _dead_letter_queues(resources)
    assert len(dead) == 5 and dead <= alarms.keys()
    for queue in dead:
        alarm = alarms[queue]
        assert alarm["Namespace"] == "AWS/SQS"
        assert alarm["Dimensions"][0]["Name"] == "QueueName"
        assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanThreshold", 0)
        assert alarm["TreatMissingData"] == "notBreaching"
        assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}]


def test_a_stuck_training_job_raises_an_alarm(resources):
    template = yaml.safe_load(TEMPLATE.read_text())
    alarm = _alarms_on(resources, "ApproximateAgeOfOldestMessage")["TrainerQueue"]
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    threshold = template["Parameters"][alarm["Threshold"]["Ref"]]
    assert threshold["Type"] == "Number" and threshold["Default"] >= 3600
    assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}]


def test_alarms_notify_an_encrypted_topic_and_optionally_an_email(resources):
    template = yaml.safe_load(TEMPLATE.read_text())
    topic = resources["AlarmTopic"]["Properties"]
    assert topic["KmsMasterKeyId"] == {"Ref": "LogsKey"}
    # CloudWatch may use the key to publish to the encrypted topic.
    key_policy = resources["LogsKey"]["Properties"]["KeyPolicy"]["Statement"]
    assert any(
        s["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
        and {"kms:Decrypt", "kms:GenerateDataKey*"} <= set(_as_list(s["Action"]))
        for s in key_policy
    )
    email = template["Parameters"]["AlarmEmail"]
    assert email["Default"] == ""
    subscription = resources["AlarmEmailSubscription"]
    assert subscription["Condition"] == "HasAlarmEmail"
    assert subscription["Properties"]["Endpoint"] == {"Ref": "AlarmEmail"}
    assert subscription["Properties"]["TopicArn"] == {"Ref": "AlarmTopic"}
    assert template["Conditions"]["HasAlarmEmail"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "AlarmEmail"}, ""]}]
    }


@pytest.mark.parametrize("service", ["evaluator", "publisher"])
def test_evaluator_and_publisher_can_run_on_the_gpu_instances(resources, service):
    """EvaluatorPublisherCapacity=Gpu: EC2 tasks with one GPU on the trainers' capacity
    provider and the -gpu image; Fargate (the default) otherwise."""
    task, container = _container(resources, service)
    assert task["RequiresCompatibilities"] == {"Fn::If": ["StagesOnGpu", ["EC2"], ["FARGATE"]]}
    assert container["ResourceRequirements"]["Fn::If"][1] == [{"Type": "GPU", "Value": "1"}]
    gpu_image, cpu_image = container["Image"]["Fn::If"][1:]
    assert gpu_image["Fn::Sub"].endswith(f"/{service}:${{ImageTag}}-gpu")
    assert cpu_image["Fn::Sub"].endswith(f"/{service}:${{ImageTag}}")
    props = resources[f"{service.capitalize()}Service"]["Properties"]
    strategy = props["CapacityProviderStrategy"]["Fn::If"][1]
    assert strategy[0]["CapacityProvider"] == {"Ref": "GpuCapacityProvider"}
    assert props["LaunchType"] == {"Fn::If": ["StagesOnGpu", {"Ref": "AWS::NoValue"}, "FARGATE"]}
    template = yaml.safe_load(TEMPLATE.read_text())
    assert template["Conditions"]["StagesOnGpu"] == {
        "Fn::Equals": [{"Ref": "EvaluatorPublisherCapacity"}, "Gpu"]
    }
    assert template["Parameters"]["EvaluatorPublisherCapacity"]["Default"] == "Fargate"


@pytest.mark.parametrize("service", SERVICES)
def test_every_task_gets_the_stacks_tracking_settings(resources, service):
    _, container = _container(resources, service)
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["TERMTUNE_TRACKING"] == {"Ref": "Tracking"}
    assert env["TERMTUNE_MLFLOW_TRACKING_URI"] == {"Ref": "MlflowTrackingUri"}


def test_mlflow_tracking_is_refused_without_a_server_and_reached_over_https():
    import re

    template = yaml.safe_load(TEMPLATE.read_text())
    parameters, rule = template["Parameters"], template["Rules"]["MlflowNeedsAServer"]
    assert parameters["Tracking"]["AllowedValues"] == ["none", "mlflow", "tensorboard", "wandb"]
    assert rule["RuleCondition"] == {"Fn::Equals": [{"Ref": "Tracking"}, "mlflow"]}
    [assertion] = rule["Assertions"]
    assert assertion["Assert"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "MlflowTrackingUri"}, ""]}]}
    pattern = parameters["MlflowTrackingUri"]["AllowedPattern"]
    assert re.fullmatch(pattern, "") and re.fullmatch(pattern, "https://mlflow.example.com")
    assert not re.fullmatch(pattern, "http://mlflow:5000")  # the tasks' egress is 443 only


WORKERS = ("dataprep", "trainer", "evaluator", "publisher")


def _dockerfile(service):
    return (TEMPLATE.parents[2] / f"services/{service}/Dockerfile").read_text()


@pytest.mark.parametrize("service", WORKERS)
def test_every_worker_reads_the_base_model_from_one_shared_cache(resources, service):
    """Issue 20: each stage downloaded the base model from the hub (three times a job)."""
    task, container = _container(resources, service)
    (volume,) = task["Volumes"]
    efs = volume["EFSVolumeConfiguration"]
    assert efs["FilesystemId"] == {"Ref": "ModelCache"}
    assert efs["TransitEncryption"] == "ENABLED"
    assert efs["AuthorizationConfig"] == {
        "AccessPointId": {"Ref": "ModelCacheAccessPoint"},
        "IAM": "ENABLED",
    }
    (mount,) = container["MountPoints"]
    assert mount["SourceVolume"] == volume["Name"]
    hf_home = _dockerfile(service).split("HF_HOME=", 1)[1].split()[0]
    assert mount["ContainerPath"] == hf_home  # the cache the libraries use, not a folder beside
    # The task role may mount and write it, through the access point only.
    policy = resources["ModelCacheClient"]["Properties"]
    assert {"Ref": task["TaskRoleArn"]["Fn::GetAtt"][0]} in policy["Roles"]
    (grant,) = policy["PolicyDocument"]["Statement"]
    assert set(grant["Action"]) == {
        "elasticfilesystem:ClientMount",
        "elasticfilesystem:ClientWrite",
    }
    assert grant["Condition"]["StringEquals"] == {
        "elasticfilesystem:AccessPointArn": {"Fn::GetAtt": ["ModelCacheAccessPoint", "Arn"]}
    }
    service_name = f"{service.capitalize()}Service"
    assert {"ModelCacheMountTargetA", "ModelCacheMountTargetB"} <= set(
        resources[service_name]["DependsOn"]
    )


def test_the_model_cache_belongs_to_the_services_user_and_is_reached_from_the_tasks_only(
    resources,
):
    uid = _dockerfile("trainer").split("--uid ", 1)[1].split()[0]
    point = resources["ModelCacheAccessPoint"]["Properties"]
    assert point["PosixUser"] == {"Uid": uid, "Gid": uid}
    assert point["RootDirectory"]["CreationInfo"]["OwnerUid"] == uid
    fs = resources["ModelCache"]["Properties"]
    assert fs["Encrypted"] is True and "KmsKeyId" in fs
    denies = {s["Sid"]: s for s in fs["FileSystemPolicy"]["Statement"] if s["Effect"] == "Deny"}
    assert denies["TlsOnly"]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert denies["OnlyThroughTheAccessPoint"]["Condition"] == {
        "Null": {"elasticfilesystem:AccessPointArn": "true"}
    }
    ingress = resources["ModelCacheSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert [(r["FromPort"], r["ToPort"], r["SourceSecurityGroupId"]) for r in ingress] == [
        (2049, 2049, {"Ref": "TaskSecurityGroup"})
    ]
    egress = resources["TaskEgressToModelCache"]["Properties"]
    assert egress["GroupId"] == {"Ref": "TaskSecurityGroup"}
    assert egress["DestinationSecurityGroupId"] == {"Ref": "ModelCacheSecurityGroup"}
    assert (egress["FromPort"], egress["ToPort"]) == (2049, 2049)


def _evaluate(node, params, conditions):
    """The few intrinsics the mount targets' subnets and conditions use."""
    if isinstance(node, (str, int)):
        return node
    if isinstance(node, list):
        return [_evaluate(n, params, conditions) for n in node]
    ((name, args),) = node.items()
    if name == "Ref":
        return params[args]
    if name == "Condition":
        return _evaluate(conditions[args], params, conditions)
    values = _evaluate(args, params, conditions)
    if name == "Fn::Join":
        return values[0].join(values[1])
    if name == "Fn::Split":
        return values[1].split(values[0])
    if name == "Fn::Select":
        return values[1][int(values[0])]
    if name == "Fn::Equals":
        return values[0] == values[1]
    if name == "Fn::Not":
        return not values[0]
    raise AssertionError(f"not evaluated here: {name}")


@pytest.mark.parametrize("count", [2, 3, 4])
def test_the_model_cache_has_a_mount_target_in_every_private_subnet(resources, count):
    """ECS mounts EFS through the mount target in the task's zone: one per subnet given."""
    conditions = yaml.safe_load(TEMPLATE.read_text())["Conditions"]
    subnets = [f"subnet-{i}" for i in range(count)]
    params = {"PrivateSubnetIds": subnets}
    reached = []
    for name, target in _of_type(resources, "AWS::EFS::MountTarget").items():
        condition = target.get("Condition")
        if condition and not _evaluate(conditions[condition], params, conditions):
            continue
        props = target["Properties"]
        assert props["FileSystemId"] == {"Ref": "ModelCache"}, name
        assert props["SecurityGroups"] == [{"Ref": "ModelCacheSecurityGroup"}], name
        reached.append(_evaluate(props["SubnetId"], params, conditions))
    assert sorted(reached) == subnets


def test_w_and_b_runs_stream_online_only_with_the_stacks_key(resources):
    """tracking.backend wandb: offline (files in the bucket) unless the stack is given a
    secret with a W&B key, which the three stages that log get at start, and the execution
    role may read."""
    import re

    template = yaml.safe_load(TEMPLATE.read_text())
    parameter = template["Parameters"]["WandbApiKeySecretArn"]
    assert parameter["Default"] == ""
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:wandb-key-AbCdEf"
    assert re.fullmatch(parameter["AllowedPattern"], arn)
    assert not re.fullmatch(parameter["AllowedPattern"], "my-wandb-key")
    assert template["Conditions"]["WandbOnline"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "WandbApiKeySecretArn"}, ""]}]
    }
    online = {"Fn::If": ["WandbOnline", "online", "offline"]}
    key = {"Name": "WANDB_API_KEY", "ValueFrom": {"Ref": "WandbApiKeySecretArn"}}
    for service in SERVICES:
        task, container = _container(resources, service)
        env = {e["Name"]: e["Value"] for e in container["Environment"]}
        if service in ("trainer", "evaluator", "publisher"):
            assert env["TERMTUNE_WANDB_MODE"] == online
            assert container["Secrets"] == {
                "Fn::If": ["WandbOnline", [key], {"Ref": "AWS::NoValue"}]
            }
        else:
            assert "TERMTUNE_WANDB_MODE" not in env
            assert "WANDB_API_KEY" not in str(_secrets(container))
        execution = resources[task["ExecutionRoleArn"]["Fn::GetAtt"][0]]
        readable = [
            r
            for s in _statements(execution)
            if "secretsmanager:GetSecretValue" in _as_list(s["Action"])
            for r in _as_list(s["Resource"])
        ]
        assert {
            "Fn::If": ["WandbOnline", {"Ref": "WandbApiKeySecretArn"}, {"Ref": "AWS::NoValue"}]
        } in readable


def test_the_fargate_stages_have_the_memory_to_load_an_8b_model_in_bf16(
    resources, tmp_path, monkeypatch
):
    """StageMemory: valid Fargate sizes for the evaluator's and the publisher's 4 vCPU; the
    largest evaluates Llama 3 8B and merges it in bf16 on the host (less what the estimate
    assumes the runtime takes); the default refuses both before loading, naming the
    setting."""
    from transformers import LlamaConfig

    from services.evaluator import handler as evaluator
    from services.publisher import export
    from shared import estimate, planner
    from shared.errors import ModelError

    parameter = yaml.safe_load(TEMPLATE.read_text())["Parameters"]["StageMemory"]
    for name in ("EvaluatorTask", "PublisherTask"):
        task = resources[name]["Properties"]
        assert task["Cpu"]["Fn::If"][2] == "4096"
        assert task["Memory"] == {"Fn::If": ["StagesOnGpu", "14336", {"Ref": "StageMemory"}]}
    sizes = parameter["AllowedValues"]
    assert parameter["Default"] == min(sizes) == 16384 and max(sizes) == 30720
    assert all(size % 1024 == 0 for size in sizes)  # Fargate: 8-30 GB in 1 GB steps at 4 vCPU
    LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_key_value_heads=8,
    ).save_pretrained(tmp_path)  # fmt: skip
    monkeypatch.setattr(export, "device", lambda: "cpu")
    monkeypatch.setattr(evaluator, "device", lambda: "cpu")
    monkeypatch.setattr(evaluator, "load_model", lambda *a, **k: "loaded")
    for mib, fits in ((max(sizes), True), (parameter["Default"], False)):
        free = mib * 2**20 - estimate.RUNTIME_BYTES  # as the estimate counts a task
        monkeypatch.setattr(planner, "device_memory", lambda dev, free=free: free)
        if fits:
            assert export.merge_plan(str(tmp_path), "bfloat16").dtype == "bfloat16"
            assert evaluator.base_on_device(str(tmp_path))[1].dtype == "bfloat16"
        else:
            for refused in (
                lambda: export.merge_plan(str(tmp_path), "bfloat16"),
                lambda: evaluator.base_on_device(str(tmp_path)),
            ):
                with pytest.raises(ModelError, match="the ECS stack: StageMemory"):
                    refused()


def test_the_stages_containers_see_their_tasks_memory_limit(resources):
    """On EC2 the agent limits the task's cgroup and the container sees only its own: each
    container that places a model by the memory it sees carries the task's limit itself."""
    for name in ("EvaluatorTask", "PublisherTask", "TrainerTask"):
        task = resources[name]["Properties"]
        (container,) = task["ContainerDefinitions"]
        limit = container["Memory"]
        if isinstance(task["Memory"], dict):  # by capacity: the same choice, the same values
            branches = task["Memory"]["Fn::If"]
            assert limit["Fn::If"][0] == branches[0]
            assert [str(v) if not isinstance(v, dict) else v for v in limit["Fn::If"][1:]] == (
                branches[1:]
            )
        else:
            assert str(limit) == task["Memory"], name


def test_the_estimate_knows_the_stacks_evaluator_and_publisher_memory(resources):
    """shared.estimate's figures for the stages' tasks are the template's."""
    from shared import estimate

    parameter = yaml.safe_load(TEMPLATE.read_text())["Parameters"]["StageMemory"]
    assert tuple(parameter["AllowedValues"]) == estimate.STAGE_MEMORY_MIB
    for name in ("EvaluatorTask", "PublisherTask"):
        memory = resources[name]["Properties"]["Memory"]["Fn::If"]
        assert memory[1:] == [str(estimate.GPU_TASK_MIB), {"Ref": "StageMemory"}]


def test_the_publisher_role_grants_every_bedrock_call_the_publisher_makes(resources):
    """Read from the publisher's code: a call its role does not grant is an access-denied
    answer in the real account, which no stand-in test shows."""
    import re

    import botocore.session

    operations = botocore.session.get_session().get_service_model("bedrock").operation_names
    snake = {re.sub(r"(?<!^)(?=[A-Z])", "_", op).lower(): op for op in operations}
    shared = {"imported_models": "ListImportedModels", "invoke": "InvokeModel"}
    code = "".join(p.read_text() for p in (TEMPLATE.parents[2] / "services/publisher").glob("*.py"))
    called = {snake[name] for name in re.findall(r"\b([a-z_]+)\b", code) if name in snake}
    called |= set(re.findall(r'_call\("(\w+)"', code))
    called |= {op for name, op in shared.items() if f"bedrock.{name}(" in code}
    assert {"CreateModelImportJob", "ListModelImportJobs", "InvokeModel"} <= called
    granted = {
        action.removeprefix("bedrock:")
        for statement in _statements(resources["PublisherTaskRole"])
        if statement["Effect"] == "Allow"
        for action in _as_list(statement["Action"])
    }
    assert called - granted == set()
