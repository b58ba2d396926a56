"""Contributor role: train an expert and its gate on private data, package it, submit it."""
