"""salt.data"""
