"""OpenFaaS python3-http template entry for the FedKeeper trigger."""

from fedkeeper.platforms import openfaas


def handle(event, context):
    """The template hands over the HTTP event; the reply is statusCode/body/headers."""
    return openfaas.handle("trigger", event, context)
