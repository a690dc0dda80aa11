"""On-demand hourly prices (USD, Linux, us-east-1) for cost estimates.

Taken from the AWS EC2 on-demand pricing page
(https://aws.amazon.com/ec2/pricing/on-demand/), recorded 2024-06-01.
Prices differ by region and change; the estimate is a guide, not a quote.
Spot is estimated as a configurable discount off these (``--spot-discount``).
A type missing here is priced as unknown (the plan says so), never guessed.
"""

PRICES_RECORDED = "2024-06-01, us-east-1"

ON_DEMAND_USD_PER_HOUR = {
    "t3.micro": 0.0104,
    "t3.medium": 0.0416,
    "t3.large": 0.0832,
    "m5.large": 0.096,
    "m5.xlarge": 0.192,
    "m5.2xlarge": 0.384,
    "m5.4xlarge": 0.768,
    "c5.large": 0.085,
    "c5.xlarge": 0.17,
    "c5.2xlarge": 0.34,
    "c5.4xlarge": 0.68,
    "c5.9xlarge": 1.53,
    "c5.18xlarge": 3.06,
    "c6i.xlarge": 0.17,
    "c6i.2xlarge": 0.34,
    "p2.xlarge": 0.90,
    "p3.2xlarge": 3.06,
    "g4dn.xlarge": 0.526,
    "g4dn.2xlarge": 0.752,
    "g5.xlarge": 1.006,
    "g6.xlarge": 0.805,
}


def hourly_usd(instance_type, *, spot=False, spot_discount=0.0):
    """Estimated USD per hour of one instance, or None when unknown."""
    price = ON_DEMAND_USD_PER_HOUR.get(instance_type)
    if price is None:
        return None
    return price * (1.0 - spot_discount) if spot else price


# gp3 storage, USD per GB-month (us-east-1, recorded as above): what a stopped fleet still costs.
EBS_GP3_USD_PER_GB_MONTH = 0.08


def ebs_monthly_usd(total_gb):
    """USD per month of ``total_gb`` of gp3 volumes (a stopped fleet's standing cost)."""
    return total_gb * EBS_GP3_USD_PER_GB_MONTH
