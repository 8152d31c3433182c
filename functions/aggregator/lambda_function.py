"""AWS Lambda entry for the FedKeeper aggregator (handler: lambda_function.handler)."""

from fedkeeper.platforms import aws


def handler(event, context):
    """Route a Lambda event (HTTP, S3 notification, schedule or direct invoke) to the aggregator."""
    return aws.handle("aggregator", event, context)
