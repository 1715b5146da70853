"""Mail out: SMTP connection pools, sendmail, URL fetching, attachment loading, and
the classification of send failures.
"""
