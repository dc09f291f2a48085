"""Flotilla's services: the AMQP bus, API, scheduler, network, storage and the CLI."""
