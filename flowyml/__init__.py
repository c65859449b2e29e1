"""flowyml"""
