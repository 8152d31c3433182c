"""OpenWhisk action entry for the FedKeeper aggregator (zip this folder with the fedkeeper package)."""

from fedkeeper.platforms import openwhisk


def main(args):
    """OpenWhisk passes the invocation's parameters as a dict and takes a dict back."""
    return openwhisk.main("aggregator", args)
