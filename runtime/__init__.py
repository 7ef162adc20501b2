"""salt.runtime"""
