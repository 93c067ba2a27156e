#!/usr/bin/env python3
"""Creates a local reset-worker stack on a moto server and enqueues a campaign.

Creates a Cognito user pool (account recovery by verified email, email
auto-verified), an app client with a generated secret, one user per distinct
username in the campaign file (email = the username if it has an `@`, else
USERNAME@example.com, verified; no invitation sent), an SQS dead-letter queue
and a main queue redriving to it (VisibilityTimeout 30, maxReceiveCount 5),
then sends every line of the campaign file (JSONL, one job per line) to the
main queue.

With --user NAME (repeatable) no campaign file is read: exactly those users
are created and nothing is enqueued; --no-campaign alone creates no users.
The integration tests (tests/support, `Stack::new`) build their stacks this way.

With --user-pool-id ID --set-password NAME (repeatable) nothing is created:
each NAME of that existing pool is given a random permanent password
(AdminSetUserPassword, Permanent: status CONFIRMED), as if the user had set
it. The demo uses it to give users a password before an
admin_reset_user_password campaign (Cognito resets only users who have one)
and to play a user who sets a new password after the reset.

Prints shell `export` lines on stdout (eval them), or with --json one JSON
object (with --set-password: nothing); progress goes to stderr.
Never point --endpoint at real AWS: the credentials are dummies.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import sys
from pathlib import Path

import boto3

REGION = "us-east-1"
DEFAULT_CAMPAIGN = Path(__file__).resolve().parent.parent / "config" / "sample-campaign.jsonl"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", required=True, help="moto server URL, e.g. http://127.0.0.1:5000")
    p.add_argument(
        "--campaign", type=Path, help=f"campaign JSONL file (default: {DEFAULT_CAMPAIGN.name} in config/)"
    )
    p.add_argument(
        "--user",
        action="append",
        metavar="NAME",
        help="create this user (repeatable) instead of the campaign's users; implies --no-campaign",
    )
    p.add_argument(
        "--no-campaign",
        action="store_true",
        help="read no campaign file and enqueue nothing; the users are those of --user, if any",
    )
    p.add_argument("--fifo", action="store_true", help="create FIFO queues instead of standard ones")
    p.add_argument(
        "--no-enqueue",
        action="store_true",
        help="create users and queues only; load the campaign with `reset-worker enqueue`",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (queue_url, dead_letter_queue_url, user_pool_id, client_id, "
        "client_secret, users, job_count) instead of shell exports",
    )
    p.add_argument(
        "--user-pool-id",
        metavar="ID",
        help="an existing pool, for --set-password (no stack is created)",
    )
    p.add_argument(
        "--set-password",
        action="append",
        metavar="NAME",
        help="give this user of --user-pool-id a random permanent password (repeatable)",
    )
    args = p.parse_args()
    if (args.set_password is None) != (args.user_pool_id is None):
        p.error("--set-password and --user-pool-id go together")
    if args.set_password is not None:
        stack_options = [args.campaign, args.user, args.no_campaign, args.fifo, args.no_enqueue, args.json]
        if any(stack_options):
            p.error("--set-password creates no stack: it cannot be combined with the stack options")
        return args
    if args.user is not None:
        args.no_campaign = True
    if args.no_campaign and args.campaign is not None:
        p.error("--campaign cannot be combined with --user or --no-campaign")
    if args.campaign is None and not args.no_campaign:
        args.campaign = DEFAULT_CAMPAIGN
    return args


def read_campaign(path: Path) -> list[str]:
    lines = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        job = json.loads(line)  # fail early on a malformed campaign file
        if not isinstance(job, dict) or not job.get("username"):
            raise SystemExit(f"{path}:{n}: every job needs a username")
        lines.append(line)
    return lines


def set_passwords(cognito, pool_id: str, usernames: list[str]) -> None:
    for username in usernames:
        # Meets the default password policy: 8+ characters, upper, lower, digit, symbol.
        password = "Aa1!" + secrets.token_urlsafe(12)
        cognito.admin_set_user_password(UserPoolId=pool_id, Username=username, Password=password, Permanent=True)
    users = "user" if len(usernames) == 1 else "users"
    print(f"local stack: pool {pool_id}, permanent password set for {len(usernames)} {users}", file=sys.stderr)


def main() -> int:
    args = parse_args()
    session = boto3.session.Session(
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name=REGION,
    )
    cognito = session.client("cognito-idp", endpoint_url=args.endpoint)
    if args.set_password is not None:
        set_passwords(cognito, args.user_pool_id, list(dict.fromkeys(args.set_password)))
        return 0

    jobs = [] if args.no_campaign else read_campaign(args.campaign)
    suffix = secrets.token_hex(4)
    sqs = session.client("sqs", endpoint_url=args.endpoint)

    pool_id = cognito.create_user_pool(
        PoolName=f"reset-worker-demo-{suffix}",
        AutoVerifiedAttributes=["email"],
        AccountRecoverySetting={"RecoveryMechanisms": [{"Priority": 1, "Name": "verified_email"}]},
    )["UserPool"]["Id"]
    app = cognito.create_user_pool_client(
        UserPoolId=pool_id,
        ClientName=f"reset-worker-{suffix}",
        GenerateSecret=True,
    )["UserPoolClient"]

    wanted = args.user if args.user is not None else (json.loads(line)["username"] for line in jobs)
    usernames = list(dict.fromkeys(wanted))
    for username in usernames:
        email = username if "@" in username else f"{username}@example.com"
        cognito.admin_create_user(
            UserPoolId=pool_id,
            Username=username,
            UserAttributes=[
                {"Name": "email", "Value": email},
                {"Name": "email_verified", "Value": "true"},
            ],
            MessageAction="SUPPRESS",
        )

    ext = ".fifo" if args.fifo else ""
    fifo_attrs = {"FifoQueue": "true", "ContentBasedDeduplication": "false"} if args.fifo else {}
    dlq_url = sqs.create_queue(QueueName=f"reset-worker-dlq-{suffix}{ext}", Attributes=dict(fifo_attrs))["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.create_queue(
        QueueName=f"reset-worker-jobs-{suffix}{ext}",
        Attributes={
            **fifo_attrs,
            "VisibilityTimeout": "30",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}),
        },
    )["QueueUrl"]

    for start in range(0, 0 if args.no_enqueue else len(jobs), 10):
        entries = []
        for i, body in enumerate(jobs[start : start + 10], start=start):
            entry = {"Id": f"job{i}", "MessageBody": body}
            if args.fifo:
                entry["MessageGroupId"] = f"g{i % 3}"
                entry["MessageDeduplicationId"] = f"{suffix}-{i}"
            entries.append(entry)
        resp = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
        if resp.get("Failed"):
            raise SystemExit(f"SendMessageBatch failed: {resp['Failed']}")

    print(
        f"local stack: pool {pool_id}, {len(usernames)} users, {len(jobs)} jobs on {queue_url}",
        file=sys.stderr,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "queue_url": queue_url,
                    "dead_letter_queue_url": dlq_url,
                    "user_pool_id": pool_id,
                    "client_id": app["ClientId"],
                    "client_secret": app["ClientSecret"],
                    "users": usernames,
                    "job_count": len(jobs),
                }
            )
        )
        return 0
    exports = {
        "RESET_WORKER_SQS__QUEUE_URL": queue_url,
        "RESET_WORKER_SQS__DEAD_LETTER_QUEUE_URL": dlq_url,
        "RESET_WORKER_COGNITO__CLIENT_ID": app["ClientId"],
        "RESET_WORKER_COGNITO__CLIENT_SECRET": app["ClientSecret"],
        "LOCAL_USER_POOL_ID": pool_id,
        "LOCAL_JOB_COUNT": str(len(jobs)),
    }
    for name, value in exports.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
