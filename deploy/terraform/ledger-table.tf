# The campaign ledger of `ledger.backend = "dynamodb"`: one item per
# (campaign, username), claimed before the worker calls Cognito and finished
# after it. Replicas and re-runs read it to skip users who already got their
# email, and `reset-worker report` writes it out as the campaign's record.
# The same table as deploy/cloudformation/ledger-table.yaml; a snippet for your
# own module (it declares no provider). `reset-worker ledger init` finds the
# table and changes nothing. The worker's policy: deploy/iam/policy.json
# (Sid CampaignLedger).

variable "table_name" {
  description = "The worker's ledger.table; deploy/iam/*.json name the table in their ARNs."
  type        = string
  default     = "reset-worker-ledger"
}

resource "aws_dynamodb_table" "ledger" {
  name = var.table_name

  # On demand: a campaign writes in bursts (limits.max_rps, two or three writes
  # per user), then nothing until the next one.
  billing_mode = "PAY_PER_REQUEST"

  # The key the worker uses; it checks it at start-up (DescribeTable).
  hash_key  = "campaign"
  range_key = "username"

  attribute {
    name = "campaign"
    type = "S"
  }

  attribute {
    name = "username"
    type = "S"
  }

  # The worker sets expires_at (epoch seconds) to the last change plus
  # ledger.retention_days; DynamoDB deletes expired items (within days; the
  # worker ignores expired ones until then).
  ttl {
    enabled        = true
    attribute_name = "expires_at"
  }

  # The ledger is the campaign's audit record (who was sent an email, when,
  # and the outcome) and what stops a second email to a user: restorable to
  # any second of the last 35 days, and hard to delete (below).
  point_in_time_recovery {
    enabled = true
  }

  # The AWS managed key (aws/dynamodb): usernames are personal data. The
  # worker's role needs no KMS permission for it; a customer managed key
  # (kms_key_arn) would need one.
  server_side_encryption {
    enabled = true
  }

  # Losing the table makes the next run email everyone again. Like the
  # CloudFormation template's DeletionPolicy/UpdateReplacePolicy Retain: a
  # plan that would destroy or replace it fails.
  deletion_protection_enabled = true

  lifecycle {
    prevent_destroy = true
  }
}

output "table_name" {
  description = "ledger.table in the worker's config"
  value       = aws_dynamodb_table.ledger.name
}

output "table_arn" {
  description = "The Resource of deploy/iam/policy.json's CampaignLedger statement"
  value       = aws_dynamodb_table.ledger.arn
}
