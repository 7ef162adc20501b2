"""salt.bench"""
