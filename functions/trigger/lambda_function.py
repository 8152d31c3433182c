"""AWS Lambda entry for the FedKeeper trigger (handler: lambda_function.handler)."""

from fedkeeper.platforms import aws


def handler(event, context):
    """Route a Lambda event (HTTP, S3 notification, schedule or direct invoke) to the trigger."""
    return aws.handle("trigger", event, context)
