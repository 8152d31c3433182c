"""OpenFaaS python3-http template entry for the FedKeeper aggregator."""

from fedkeeper.platforms import openfaas


def handle(event, context):
    """The template hands over the HTTP event; the reply is statusCode/body/headers."""
    return openfaas.handle("aggregator", event, context)
